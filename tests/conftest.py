"""Shared test set-up: CPU only, offline, quiet trackers."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("LDM_PROGRESS_INTERVAL", "5")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker and the processes it starts get one thread: two
# workers x two threads on two cores spend their time in OpenMP waits.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(THREADS)


@pytest.fixture
def one_thread():
    """For tests of tiny models: one intra-op thread is as fast, and spares them OpenMP waits on a busy machine
    (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage2_setup(tmp_path_factory):
    """A tiny text-conditional stage-2 context on `shapes` from images (no cache), and its initial UNet
    (tests/test_performance.py, tests/test_recipe_levers.py)."""
    import copy

    from accelerate import Accelerator

    import stage2_diffusion_trainer
    from src.config import Stage2TrainConfig, load_model_config
    from src.training.stage2 import setup_context
    from tests.helpers import make_tiny_clip, reset_accelerate
    from tests.stage2_helpers import make_vae_file, tiny_unet, write_model_config

    d = tmp_path_factory.mktemp("perf_stage2")
    model_path = write_model_config(d / "ldm.yaml", tiny_unet(str(make_tiny_clip(d / "clip"))), {"shapes": 0.9})
    cfg = Stage2TrainConfig(per_gpu_batch_size=4, num_workers=0, pin_memory=False, shapes_num_images=8,
                            lr_warmup_steps=0, learning_rate=1e-3, weight_decay=0.0)
    args = stage2_diffusion_trainer.parse_args([
        "--working_directory", str(d / "work"), "--training_config", "unused.yaml", "--model_config", str(model_path),
        "--path_to_vae_backbone", str(make_vae_file(d / "v")), "--dataset", "shapes",
    ])
    reset_accelerate()
    torch.manual_seed(0)
    ctx, dataset = setup_context(args, Accelerator(cpu=True), cfg, load_model_config(model_path))
    return ctx, dataset, copy.deepcopy(ctx.unet_module)
