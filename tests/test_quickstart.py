"""`make demo`'s pipeline (scripts/quickstart.sh) end to end with a tiny budget: every hand-off between stages."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from src.config import load_model_config
from tests.conftest import ROOT

TINY_STAGE1 = {
    "total_training_iterations": 16, "per_gpu_batch_size": 8, "val_generation_freq": 8, "checkpoint_iterations": 8,
    "disc_start": 8, "lr_warmup_steps": 2, "disc_lr_warmup_steps": 2, "shapes_num_images": 64,
}
TINY_STAGE2 = {
    "total_training_iterations": 12, "per_gpu_batch_size": 8, "val_generation_freq": 6, "checkpoint_iterations": 6,
    "val_sampler_steps": 4, "lr_warmup_steps": 2, "shapes_num_images": 64,
}


def _tiny_configs(folder):
    folder.mkdir()
    src = ROOT / "configs" / "quickstart"
    for name, overrides in (("stage1_vae_train.yaml", TINY_STAGE1), ("stage2_diffusion_train.yaml", TINY_STAGE2)):
        cfg = yaml.safe_load((src / name).read_text())
        assert set(overrides) <= set(cfg), "the quickstart config lost a key the test shrinks"
        cfg.update(overrides)
        (folder / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("ldm.yaml", "prompts.txt"):
        (folder / name).write_text((src / name).read_text())
    return folder


def test_quickstart_pipeline_hands_off_between_stages(tmp_path):
    out = tmp_path / "quickstart"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        QUICKSTART_OUT=str(out),
        QUICKSTART_CONFIGS=str(_tiny_configs(tmp_path / "configs")),
        QUICKSTART_SEED="3",
        EVAL_PROMPTS="6",
        SAMPLE_STEPS="4",
    )
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = out / "work"

    # every stage reported its time
    times = (out / "stage_times.txt").read_text()
    for stage in ("1. stage 1", "2. reconstructions", "3. scaling factor", "4. stage 2", "5. inference",
                  "6. prompt adherence", "7. training curves", "total"):
        assert stage in times

    # QUICKSTART_SEED reaches both training configs; the shipped ones keep theirs
    for name in ("stage1_vae_train.yaml", "stage2_diffusion_train.yaml"):
        assert yaml.safe_load((work / name).read_text())["seed"] == 3
        assert yaml.safe_load((ROOT / "configs" / "quickstart" / name).read_text())["seed"] == 0

    import torch

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # stage 1 -> an autoencoder that reconstructs at the config's size, plus reconstruction grids
    from src.models.vae import load_autoencoder

    vae = load_autoencoder(work / "vae" / "model.safetensors")
    mean, std = vae.latent_moments(x)
    assert mean.shape == (2, 4, 8, 8) and vae.decode_latent(mean).shape == (2, 3, 32, 32)
    assert list((out / "vae_reconstructions").glob("*.png"))
    recon = json.loads((out / "vae_evaluation" / "results.json").read_text())
    assert recon["num_prompts"] == 6 and recon["source"] == "autoencoder reconstructions of renders"

    # scaling factor written into the demo's copy of ldm.yaml only
    scale = load_model_config(work / "ldm.yaml").scaling_constants["shapes"]
    assert scale != 1.0 and 0.01 < scale < 100
    assert load_model_config(ROOT / "configs" / "quickstart" / "ldm.yaml").scaling_constants["shapes"] == 1.0

    # stage 2 -> a pipeline that carries that factor; samples during training; inference images
    from src.pipeline import load_pipeline

    pipe = load_pipeline(work / "diffusion" / "model.safetensors")
    assert pipe.conditioning == "text" and pipe.scaling_factor == pytest.approx(scale, rel=1e-6)
    assert list((out / "diffusion_samples").glob("*.png"))
    singles = sorted((out / "generations").glob("[0-9][0-9][0-9].png"))
    assert len(singles) == 16 and Image.open(singles[0]).size == (32, 32)
    assert (out / "generations" / "grid.png").is_file()

    # prompt adherence table
    result = json.loads((out / "evaluation" / "results.json").read_text())
    assert result["num_prompts"] == 6
    for key in ("shape_color", "background_color", "shape", "clean"):
        assert 0.0 <= result[key] <= 1.0
    assert result["source"] == "samples, dpmpp_2m-4, guidance 2.0"
    assert "a " in result["prompts"][0] and "background" in result["prompts"][0]

    # the training curves of both runs, in one PNG, and TensorBoard event files of each run
    assert f"wrote {out / 'curves.png'} (2 run(s)" in proc.stdout
    assert Image.open(out / "curves.png").format == "PNG"
    for run in ("vae", "diffusion"):
        assert list((work / run / "tensorboard").rglob("events.out.tfevents.*")), run


def test_gpu_configs_set_cuda_graphs_and_the_ema_every_10_steps_and_nothing_else(tmp_path):
    """QUICKSTART_GPU=1's rewrite of the demo's work copies (scripts/quickstart_gpu_configs.sh): the files still
    load, stage 2 gets CUDA graphs and the EMA every 10 steps, every other key of both keeps its value; a key the
    file lacks stops the script, naming it."""
    from src.config import Stage1TrainConfig, Stage2TrainConfig, load_config, to_dict

    src = ROOT / "configs" / "quickstart"
    names = {"stage1_vae_train.yaml": Stage1TrainConfig, "stage2_diffusion_train.yaml": Stage2TrainConfig}
    for name in names:
        (tmp_path / name).write_text((src / name).read_text())
    script = ROOT / "scripts" / "quickstart_gpu_configs.sh"
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, capture_output=True, text=True)
    shipped = {n: to_dict(load_config(src / n, c)) for n, c in names.items()}
    gpu = {n: to_dict(load_config(tmp_path / n, c)) for n, c in names.items()}
    g2 = gpu["stage2_diffusion_train.yaml"]
    assert (g2["compile"], g2["compile_mode"], g2["ema_update_every"]) == (True, "reduce-overhead", 10)
    changed = {n: {k for k in shipped[n] if shipped[n][k] != gpu[n][k]} for n in names}
    assert changed == {"stage1_vae_train.yaml": set(),
                       "stage2_diffusion_train.yaml": {"compile", "compile_mode", "ema_update_every"}}

    text = (tmp_path / "stage2_diffusion_train.yaml").read_text()
    (tmp_path / "stage2_diffusion_train.yaml").write_text(text.replace("ema_update_every:", "# ema_update_every:"))
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "ema_update_every" in proc.stderr



def test_every_sampler_knob_gives_arguments_the_sampling_scripts_accept(tmp_path):
    """SAMPLER is a documented knob of the demo. DDPM runs every training step and inference_ldm.py /
    evaluate_shapes.py refuse --num_steps beside it, so SAMPLER=ddpm used to stop the demo at stage 5. The stage
    scripts are replaced by a recorder of their arguments, which go through the two scripts' real parsers here."""
    import evaluate_shapes
    import inference_ldm

    log = tmp_path / "calls.jsonl"
    recorder = tmp_path / "python"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[1]), sys.argv[2:]]) + '\\n')\n")
    recorder.chmod(0o755)
    for sampler in ("ddpm", "ddim"):
        log.write_text("")
        env = dict(os.environ, PYTHON=str(recorder), QUICKSTART_OUT=str(tmp_path / "out"), SAMPLER=sampler,
                   SAMPLE_STEPS="7")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        sampling = [(script, argv) for script, argv in calls if "--sampler" in argv]
        assert [script for script, _ in sampling] == ["inference_ldm.py", "evaluate_shapes.py"]
        for script, argv in sampling:
            parser = {"inference_ldm.py": inference_ldm, "evaluate_shapes.py": evaluate_shapes}[script]
            args = parser.parse_args(argv)  # SystemExit on a combination the script refuses
            assert args.sampler == sampler and args.num_steps == (None if sampler == "ddpm" else 7), (script, argv)
