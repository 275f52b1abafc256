"""The whole stage-2 trainer step from the latent cache, as img/s beside the isolated UNet step, same process.

The trainer runs as stage2_diffusion_trainer.py runs it (setup_context, build_training_state, InfiniteLoader with
the YAML's workers and pinned memory, train_loop: flips, posterior sample, noise, condition dropout, the UNet
under the run's mixed precision, gradient clipping, fused AdamW with the non-finite guard, the LR schedule, the
EMA, metrics at log_every), here on the design's configs/ldm.yaml UNet and VAE (random weights: speed does
not depend on them), the built-in `shapes` images at the VAE's 256 px, and a random 768-d CLIP-style text
encoder (a one-layer CLIPTextModel with a tokenizer trained on the shapes captions), all made locally.

Timing: the loader is wrapped so that the time between handing out batch `warmup` and batch `warmup + steps`
(the device synchronised at both) covers exactly `steps` whole trainer steps; the run stops there, before the
final checkpoint; a window in which torch.compile built a graph is timed again. The isolated step then times the
same UNet (compiled the same way, same attention kernel) on one batch of the same shapes: forward under autocast,
the MSE, backward and the optimizer's step, nothing else.

    python bench/bench_stage2_step.py --batch 64 --device cuda --mixed_precision bf16 [--compile --compile_mode reduce-overhead]
    .venv/bin/python bench/bench_stage2_step.py --tiny --batch 4 --device cpu       # a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402

from gpu_lock import gpu_exclusive  # noqa: E402
from mfu import synchronize, time_per_call  # noqa: E402


class StopBench(Exception):
    """Raised by the timed loader once the measured steps are done."""


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class TimedBatches:
    """Wraps the trainer's loader: records the time at batch `start` and `start + steps`, then stops the run. A
    window in which torch.compile built a new graph (e.g. the first batch whose captions need no mask) is not a
    step time: the window starts again, up to `retries` times, and `recompiled` counts those windows."""

    def __init__(self, loader, start: int, steps: int, device: torch.device, retries: int = 3,
                 hold: Optional[contextlib.ExitStack] = None):
        self.loader, self.start, self.steps, self.device, self.retries = loader, start, steps, device, retries
        self.hold = hold  # takes gpu_exclusive() after the first step, until the caller closes it
        self.seconds = None
        self.recompiled = 0

    def __iter__(self):
        t0, graphs, start = None, 0, self.start
        for i, batch in enumerate(self.loader):
            if i == start + self.steps:
                synchronize(self.device)
                if compiled_graphs() != graphs and self.recompiled < self.retries:
                    self.recompiled += 1
                    start = i  # time a fresh window from here
                else:
                    self.seconds = time.perf_counter() - t0
                    raise StopBench
            if i == 1 and self.hold is not None:  # the first (compiling) step is done: warm-up steps and windows
                self.hold.enter_context(gpu_exclusive())  # have the GPU alone
            if i == start:
                synchronize(self.device)
                t0, graphs = time.perf_counter(), compiled_graphs()
            yield batch


def make_assets(work: Path, tiny: bool) -> dict:
    """A random VAE file, a random CLIP-style text encoder folder and the model YAML that points at both."""
    from src.config import ModelConfig, VAEConfig, load_model_config, to_dict
    from tests.helpers import make_tiny_clip
    from tests.stage2_helpers import make_vae_file

    work.mkdir(parents=True, exist_ok=True)
    model_cfg = load_model_config(ROOT / "configs" / "ldm.yaml")
    text_dim = 32 if tiny else model_cfg.unet.text_embed_dim
    vae_cfg = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, groupnorm_groups=4) \
        if tiny else model_cfg.vae
    unet = model_cfg.unet
    if tiny:
        unet.unet_channels_per_block, unet.unet_residual_layers_per_block = [32, 64], 1
        unet.down_block_types, unet.up_block_types = ["AttnDown", "Down"], ["Up", "AttnUp"]
        unet.attention_head_dim, unet.time_embed_start_dim, unet.time_embed_proj_dim = 16, 32, 64
    clip = make_tiny_clip(work / "clip", hidden_size=text_dim, layers=1)
    unet.text_conditioning_hf_model, unet.text_embed_dim = str(clip), text_dim
    vae_file = make_vae_file(work / "vae.safetensors", vae_cfg=vae_cfg)
    model = ModelConfig(vae=vae_cfg, unet=unet, scaling_constants={"shapes": 1.0})
    (work / "ldm.yaml").write_text(yaml.safe_dump(to_dict(model), sort_keys=False))
    return {"vae": vae_file, "model_config": work / "ldm.yaml"}


def parse_overrides(items) -> dict:
    """Training keys from "key=value" strings (values read as YAML: 1, true, 0.5, text)."""
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def train_config(work: Path, batch: int, images: int, compiled: bool, mode: str, tiny: bool,
                 overrides: Optional[dict] = None) -> Path:
    """configs/stage2_diffusion_train.yaml with the bench's batch, no validation and no checkpoints on the way, and
    `overrides` (training keys, for A/B rows such as ema_update_every=1)."""
    cfg = yaml.safe_load((ROOT / "configs" / "stage2_diffusion_train.yaml").read_text())
    cfg.update(per_gpu_batch_size=batch, total_training_iterations=10**6, checkpoint_iterations=0,
               val_generation_freq=0, shapes_num_images=images, lr_warmup_steps=10, compile=compiled,
               compile_mode=mode, channels_last=compiled and not tiny)
    if tiny:
        cfg.update(num_workers=0, pin_memory=False)
    cfg.update(overrides or {})
    path = work / f"train_b{batch}_{'compiled' if compiled else 'eager'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def isolated_step(ctx, state, loader, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per UNet step alone on one batch of the trainer's shapes (forward, MSE, backward, optimizer)."""
    from src.diffusion.schedule import diffusion_loss
    from src.training.performance import attention_kernels
    from src.training.stage2 import batch_condition, latent_moments, sample_latents

    batch = next(iter(loader))
    mean, std = latent_moments(batch, ctx.vae, ctx.train_cfg.random_flip_p, state.randomness.flip, device)
    z0 = sample_latents(mean, std, state.randomness.noise) * ctx.scaling_factor  # (B, C, h, w)
    cond = batch_condition(batch, ctx.conditioning, ctx.text_encoder, device)
    t = ctx.process.sample_timesteps(z0.shape[0], device, state.randomness.noise)
    noise = torch.randn_like(z0)
    z_t, target = ctx.process.add_noise(z0, noise, t), ctx.process.training_target(z0, noise, t)
    optimizer = state.trainable.optimizer

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        dropped = ctx.unet_module.drop_condition(cond, ctx.train_cfg.cfg_dropout_prob, state.randomness.noise)
        with state.precision.autocast(), attention_kernels(ctx.train_cfg.attention_backend):  # as the trainer
            pred = state.unet(z_t, t, dropped)
        diffusion_loss(pred, target, ctx.train_cfg.loss_fn).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_per_call(step, device, warmup, steps)


def run(batch: int, device: torch.device, compiled: bool = False, compile_mode: str = "default", tiny: bool = False,
        work_dir: Path = Path("/tmp/bench_stage2_step"), steps: tuple[int, int] = (5, 15),
        mixed_precision: str = "bf16", backend: str = "inductor", overrides: Optional[dict] = None) -> dict:
    """Trainer img/s and isolated-step img/s at `batch`; returns both and their ratio. `overrides`: training keys
    set over the GPU config's."""
    from accelerate.state import AcceleratorState, GradientState

    import stage2_diffusion_trainer as trainer
    from src.config import Stage2TrainConfig, load_config, load_model_config
    from src.data.loader import InfiniteLoader
    from src.training.setup import make_accelerator
    from src.training.latent_cache import LatentCacheError
    from src.training.stage2 import build_training_state, setup_context, train_loop

    warmup, timed = steps
    work_dir = Path(work_dir)
    assets = make_assets(work_dir / "assets", tiny) if not (work_dir / "assets" / "ldm.yaml").is_file() else \
        {"vae": work_dir / "assets" / "vae.safetensors", "model_config": work_dir / "assets" / "ldm.yaml"}
    images = 64 if tiny else 1024  # one cache for every batch size; 16 batches of 64 per epoch
    train_path = train_config(work_dir, batch, images, compiled, compile_mode, tiny, overrides)
    run_dir = work_dir / f"run_b{batch}_{time.time_ns()}"
    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision if device.type == "cuda" else "no"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = trainer.parse_args([
        "--working_directory", str(run_dir), "--training_config", str(train_path),
        "--model_config", str(assets["model_config"]), "--path_to_vae_backbone", str(assets["vae"]),
        "--dataset", "shapes", "--cache_latents", str(work_dir / f"cache_{images}"),
    ])
    train_cfg = load_config(args.training_config, Stage2TrainConfig)
    accelerator = make_accelerator(args, train_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with gpu_exclusive():  # builds the latent cache: the VAE encodes every image on the GPU
        try:
            ctx, dataset = setup_context(args, accelerator, train_cfg, load_model_config(args.model_config))
        except LatentCacheError as err:  # the bench's own cache, left by another version of the code: rebuild it
            print(f"rebuilding {args.cache_latents}: {err}")
            shutil.rmtree(args.cache_latents)
            ctx, dataset = setup_context(args, accelerator, train_cfg, load_model_config(args.model_config))
    state = build_training_state(accelerator, ctx)
    if compiled and backend != "inductor":  # CPU dry runs: swap the (not yet traced) inductor wrapper
        from src.training.performance import compile_module

        state.unet = compile_module(state.unet._orig_mod, train_cfg, backend)
    loader = InfiniteLoader(dataset, batch, seed=train_cfg.seed, num_workers=train_cfg.num_workers,
                            pin_memory=train_cfg.pin_memory)
    with contextlib.ExitStack() as timing:  # the GPU to this process from the first timed window to the end
        timed_loader = TimedBatches(loader, warmup, timed, accelerator.device, hold=timing)
        try:
            train_loop(args, accelerator, ctx, state, timed_loader)
        except StopBench:
            pass
        trainer_s = timed_loader.seconds / timed
        isolated_s = isolated_step(ctx, state, loader, accelerator.device, warmup, timed)
    out = {"trainer_img_s": batch / trainer_s, "isolated_img_s": batch / isolated_s, "trainer_ms": 1e3 * trainer_s,
           "isolated_ms": 1e3 * isolated_s, "ratio": isolated_s / trainer_s, "mixed_precision": str(accelerator.mixed_precision),
           "windows_with_a_recompile": timed_loader.recompiled, "attention_backend": train_cfg.attention_backend,
           "ema_update_every": train_cfg.ema_update_every, "overrides": overrides or {},
           "text_len": int(next(iter(loader))["text_embeds"].shape[1]) if ctx.conditioning == "text" else None}
    print(f"batch {batch} ({'compile ' + compile_mode if compiled else 'eager'}): trainer {out['trainer_img_s']:.1f} img/s "
          f"({out['trainer_ms']:.1f} ms/step), isolated UNet step {out['isolated_img_s']:.1f} img/s "
          f"({out['isolated_ms']:.1f} ms); trainer / isolated {out['ratio']:.3f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 16])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny models (a CPU check of the code path)")
    p.add_argument("--work_dir", default="/tmp/bench_stage2_step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training key over the GPU config's (YAML value), e.g. --set ema_update_every=1")
    args = p.parse_args()
    overrides = parse_overrides(args.set)
    for batch in args.batch:
        run(batch, torch.device(args.device), args.compile, args.compile_mode, args.tiny, Path(args.work_dir),
            (args.warmup, args.steps), args.mixed_precision, overrides=overrides)


if __name__ == "__main__":
    main()
