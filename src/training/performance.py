"""Speed settings of a training run: CUDA backend flags, torch.compile, the channels_last memory format and the
attention kernel.

    configure_backends(cfg)                    # TF32 and cudnn.benchmark on CUDA (process-wide)
    use_compile_cache(cfg, working_dir)        # compiled kernels kept in working_dir/compile_cache (before compiling)
    to_memory_format(module, cfg)              # NHWC weights when channels_last: True
    unet_step = compile_module(unet, cfg)      # torch.compile(unet, mode=compile_mode) when compile: True
    compile_autoencoder(vae, cfg)              # in place: every block of the VAE but the decoder's output layer
    with attention_kernels(cfg.attention_backend): ...   # SDPA tries that kernel first in the step's forward

The training YAMLs of both stages carry the keys (`compile`, `compile_mode`, `compile_cache`, `channels_last`,
`allow_tf32`, `attention_backend`); none changes what is computed beyond floating-point rounding (TF32 rounds fp32
matmul inputs to a 10-bit mantissa; attention kernels differ in their rounding).
`compile_mode: reduce-overhead` adds CUDA graphs: the step then replays one recorded graph per input shape,
which removes the host's launch overhead at small batches; `mark_step` tells the graphs where a step begins. With
gradient accumulation the graphs are left out (compile_mode()).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import TrainConfig

logger = logging.getLogger(__name__)


def configure_backends(cfg: TrainConfig) -> None:
    """On CUDA: TF32 tensor cores for fp32 matmuls and convolutions (allow_tf32), cuDNN's autotuner on."""
    if not torch.cuda.is_available():
        return
    torch.set_float32_matmul_precision("high" if cfg.allow_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.benchmark = True  # conv shapes are fixed within a run: pick the fastest algorithm once


# SDPA's kernels in its default order (torch 2.11-2.14), tried in this order after the preferred one
_SDPA_ORDER = ("flash", "efficient", "math", "cudnn")
_SDPA_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
               "math": "MATH"}


def attention_kernels(preferred: str):
    """A context in which scaled_dot_product_attention tries the `preferred` kernel first; where it cannot run (a
    CPU, a mask or head size it does not take) the others follow in SDPA's order, so nothing fails that `auto`
    runs. `auto`: SDPA's own choice. The backward pass uses the kernel the forward chose.

    Measured on an H200 (README, "Speed on a GPU"): cuDNN attention made the design UNet's bf16 training step
    13 % faster at 32x32 batch 64 and 12 % at batch 16 than SDPA's own choice (flash), equal at 64x64."""
    if preferred == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [preferred] + [name for name in _SDPA_ORDER if name != preferred]
    return sdpa_kernel([getattr(SDPBackend, _SDPA_NAMES[name]) for name in order], set_priority=True)


def to_memory_format(module: Optional[nn.Module], cfg: TrainConfig) -> Optional[nn.Module]:
    """`module` with channels_last (NHWC) 4-d weights when cfg.channels_last; convolutions then take and return
    NHWC activations (their inputs are converted by the first conv). In place; returns the module."""
    if module is not None and cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's on-disk caches; Triton's kernels go below it


def use_compile_cache(cfg: TrainConfig, working_dir) -> Optional[Path]:
    """Keep torch.compile's on-disk caches (inductor's FX graphs and AOTAutograd graphs, the generated kernels,
    autotuning results) in working_dir/compile_cache when cfg.compile and cfg.compile_cache, so that a run resumed
    on this machine or on another one that mounts the working directory loads its compiled step instead of
    compiling it again. torch's default, /tmp/torchinductor_<user>, is lost with a preempted machine. Measured on
    this project's CPU: the demo UNet's first compiled training step took 64.3 s cold and 2.4 s from the cache.

    A TORCHINDUCTOR_CACHE_DIR chosen before the run wins. Inductor guards its cache with file locks, which some
    network file systems refuse: where the working directory cannot hold one, torch's default stays, with a
    warning. Call before anything compiles; returns the directory the caches use, or None when compile or
    compile_cache is off or the working directory cannot be used (torch's default then applies)."""
    if not (cfg.compile and cfg.compile_cache):
        return None
    chosen = os.environ.get(COMPILE_CACHE_ENV)
    if chosen and not is_torch_default_cache(chosen):
        return Path(chosen)
    path = Path(working_dir).resolve() / "compile_cache"
    try:
        takes_file_locks(path)
    except (OSError, TimeoutError) as err:
        logger.warning("compile_cache: %s cannot hold inductor's cache (%s); using torch's default", path, err)
        return None
    os.environ[COMPILE_CACHE_ENV] = str(path)  # inductor reads it at every cache access, its workers included
    return path


def takes_file_locks(directory: Path) -> None:
    """Create `directory` and take and release a file lock in it, as inductor does; raises OSError (or
    filelock's Timeout, a TimeoutError) where that fails."""
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / "probe.lock"), timeout=30):
        pass


def is_torch_default_cache(path) -> bool:
    """torch's own cache location, <tmp>/torchinductor_<user>, which importing torch._dynamo writes into
    TORCHINDUCTOR_CACHE_DIR: that value says nothing about the user's choice."""
    path = Path(path)
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith("torchinductor_")


# compile modes that record CUDA graphs, and the same mode without them
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
_warned: set = set()


def compile_mode(cfg: TrainConfig) -> str:
    """cfg.compile_mode, except that gradients accumulated over micro-batches turn CUDA graphs off (with a warning):
    inductor's CUDA-graph trees hand the first micro-batch's parameter gradients out of their memory pool, and the
    next replay overwrites them, which gives wrong gradients or an error (pytorch/pytorch#169545)."""
    mode = cfg.compile_mode
    if mode in _WITHOUT_CUDA_GRAPHS and cfg.gradient_accumulation_steps > 1:
        if mode not in _warned:
            _warned.add(mode)
            logger.warning("compile_mode: %s records CUDA graphs, which break gradient accumulation "
                           "(gradient_accumulation_steps: %d); compiling with %s instead", mode,
                           cfg.gradient_accumulation_steps, _WITHOUT_CUDA_GRAPHS[mode])
        return _WITHOUT_CUDA_GRAPHS[mode]
    return mode


def compile_kwargs(cfg: TrainConfig, backend: str = "inductor") -> dict:
    """torch.compile's arguments for compile_mode(cfg); another `backend` (benches' CPU dry runs) takes no mode."""
    if backend != "inductor":
        return {"backend": backend}
    mode = compile_mode(cfg)
    return {} if mode == "default" else {"mode": mode}


def compile_module(module: nn.Module, cfg: TrainConfig, backend: str = "inductor"):
    """torch.compile(module) when cfg.compile, else the module itself.

    The compiled wrapper is what the training step calls; the plain module stays the one that is saved, averaged
    (EMA) and sampled from, so checkpoints keep their keys and validation never waits for a recompile."""
    if not cfg.compile:
        return module
    kwargs = compile_kwargs(cfg, backend)
    logger.info("torch.compile(%s, mode=%s): the first steps compile", type(module).__name__, compile_mode(cfg))
    return torch.compile(module, **kwargs)


def compile_autoencoder(vae: nn.Module, cfg: TrainConfig, backend: str = "inductor") -> nn.Module:
    """Compile the autoencoder's encoder and decoder blocks in place, leaving the decoder's output layer eager.

    The adaptive GAN weight differentiates the losses with respect to that last layer only. Inside a compiled
    graph that gradient would run the graph's whole backward (every parameter's gradient) twice more per step;
    outside it, autograd stops at the layer. State-dict keys are unchanged."""
    if not cfg.compile:
        return vae
    kwargs = compile_kwargs(cfg, backend)
    vae.encoder.compile(**kwargs)
    decoder = vae.decoder
    decoder.mid_block.compile(**kwargs)
    for block in decoder.up_blocks:
        block.compile(**kwargs)
    return vae


def compile_in_place(module: Optional[nn.Module], cfg: TrainConfig, backend: str = "inductor") -> Optional[nn.Module]:
    """module.compile() (keys and parameters unchanged) when cfg.compile; for the discriminator and LPIPS."""
    if module is not None and cfg.compile:
        module.compile(**compile_kwargs(cfg, backend))
    return module


def mark_step() -> None:
    """Start of a training step for CUDA graphs (compile_mode: reduce-overhead): the previous step's graph
    outputs may be overwritten from here on. Harmless otherwise."""
    torch.compiler.cudagraph_mark_step_begin()


def mark_text_dynamic(text: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None) -> None:
    """Compile one graph for every caption length: the text's length varies from batch to batch."""
    for tensor in (text, mask):
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
