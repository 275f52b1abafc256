"""bench/gpu_lock.py: benches started together take turns in their gpu_exclusive() sections."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from gpu_lock import gpu_exclusive
    time.sleep(float(sys.argv[3]))
    with gpu_exclusive():
        with gpu_exclusive():  # re-entrant: the inner block neither waits nor lets go
            start = time.time()
            time.sleep(0.4)
        time.sleep(0.4)
        end = time.time()
    open(sys.argv[2], "w").write(f"{start} {end}")
""")


def windows(tmp_path, lock: bool) -> list[tuple[float, float]]:
    env = {**os.environ, "BENCH_GPU_LOCK": str(tmp_path / "gpu.lock")} if lock else \
        {k: v for k, v in os.environ.items() if k != "BENCH_GPU_LOCK"}
    outs = [tmp_path / f"{lock}_{i}.txt" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(BENCH), str(out), str(0.05 * i)], env=env)
             for i, out in enumerate(outs)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    return sorted(tuple(map(float, out.read_text().split())) for out in outs)


def test_exclusive_sections_never_overlap(tmp_path):
    held = windows(tmp_path, lock=True)
    for (_, end), (start, _) in zip(held, held[1:]):
        assert start >= end - 1e-3  # the next process entered after the previous one left, inner block included
    free = windows(tmp_path, lock=False)  # without the variable the sections run together (the test can fail)
    assert any(start < end for (_, end), (start, _) in zip(free, free[1:]))
