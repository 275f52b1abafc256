"""The latent denoiser: a conditional UNet whose parameters map one-to-one onto diffusers' UNet2DConditionModel.

    unet = build_unet(model_cfg.unet, in_channels=4, conditioning="text")   # "none" | "class" | "text"
    eps = unet(x_t, t, Condition(text=emb, text_mask=mask))                # (B, 4, h, w)

Layout (channels [c0, c1, c2, c3], n = unet_residual_layers_per_block):

    time_proj (sinusoidal, time_embed_start_dim) -> time_embedding (linear_1, SiLU, linear_2: time_embed_proj_dim)
        (+ class_embedding(label), projected when class_embed_dim != time_embed_proj_dim)
    conv_in                                                          (B, c0, h, w)
    down_blocks[i]: n x (ResnetBlock2D [+ Transformer2D]) + Downsample2D (all but the last)
    mid_block:      ResnetBlock2D, Transformer2D ("AttnMid" only), ResnetBlock2D
    up_blocks[i]:   (n + 1) x (ResnetBlock2D on [h, skip] [+ Transformer2D]) + Upsample2D (all but the last)
    conv_norm_out -> SiLU -> conv_out                                (B, C, h, w)

Every resnet output and every downsampler output of the encoder half (plus conv_in's) is a skip connection,
consumed in reverse order by the decoder half, as in diffusers and LDM's openaimodel.

Key names equal diffusers' with use_linear_projection=True, except that our Attention's output projection is
`to_out` where diffusers has `to_out.0`. Extra keys diffusers has no counterpart for: `null_text_embedding`
(the learned null text token for classifier-free guidance), `class_embedding_proj` (only when
class_embed_dim != time_embed_proj_dim) and `time_proj.freqs` (only when time_embed_requires_grad).
Without text conditioning the Transformer2D blocks have self-attention and feed-forward only (no norm2/attn2),
as diffusers' BasicTransformerBlock with cross_attention_dim=None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from src.config import UNetConfig
from src.models.layers import (Attention, Downsample2D, LayerNorm, ResnetBlock2D, Upsample2D, attention_mask,
                               group_norm)

CONDITIONINGS = ("none", "class", "text")
DOWN_TYPES = ("AttnDown", "Down")
UP_TYPES = ("AttnUp", "Up")
MID_TYPES = ("AttnMid", "Mid")


# --------------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Condition:
    """What the UNet is conditioned on. Text: (B, L, D) embeddings plus a (B, L) mask (1 real, 0 padding)."""

    text: Optional[torch.Tensor] = None  # (B, L, D)
    text_mask: Optional[torch.Tensor] = None  # (B, L)
    labels: Optional[torch.Tensor] = None  # (B,) long

    @property
    def batch_size(self) -> int:
        if self.text is not None:
            return self.text.shape[0]
        if self.labels is not None:
            return self.labels.shape[0]
        raise ValueError("empty Condition")

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Condition":
        """Move to `device`; `dtype` applies to the text embeddings only (masks and labels keep theirs)."""
        return Condition(
            text=None if self.text is None else self.text.to(device=device, dtype=dtype, non_blocking=non_blocking),
            text_mask=None if self.text_mask is None else self.text_mask.to(device=device, non_blocking=non_blocking),
            labels=None if self.labels is None else self.labels.to(device=device, non_blocking=non_blocking),
        )

    def full_mask(self) -> Optional[torch.Tensor]:
        """The text mask, or all ones when the text has no padding mask. (B, L) long."""
        if self.text is None:
            return None
        if self.text_mask is None:
            return torch.ones(self.text.shape[:2], dtype=torch.long, device=self.text.device)
        return self.text_mask.long()

    @staticmethod
    def cat(a: "Condition", b: "Condition") -> "Condition":
        """Batch-concatenate [a; b]. Text is zero-padded to the longer length, the padding masked out."""
        if (a.text is None) != (b.text is None) or (a.labels is None) != (b.labels is None):
            raise ValueError("Condition.cat: both conditions must carry the same fields (text and/or labels)")
        text = mask = labels = None
        if a.text is not None:
            length = max(a.text.shape[1], b.text.shape[1])
            texts, masks = [], []
            for c in (a, b):
                pad = length - c.text.shape[1]
                texts.append(F.pad(c.text, (0, 0, 0, pad)))  # (B, L, D): zeros appended along L
                masks.append(F.pad(c.full_mask(), (0, pad)))  # (B, L): padding marked 0
            text = torch.cat(texts, dim=0)
            mask = torch.cat(masks, dim=0)
        if a.labels is not None:
            labels = torch.cat([a.labels, b.labels], dim=0)
        return Condition(text=text, text_mask=mask, labels=labels)

    def trimmed(self, multiple: int = 8, device=None) -> "Condition":
        """The same condition without the padding no caption of the batch reaches (the UNet's output is unchanged).

        The text is cut after the last real token of the longest caption. When every row is then real, the mask
        is dropped (SDPA can use its flash kernel); otherwise the length is rounded up to a multiple of `multiple`
        (zero tokens, masked), which keeps SDPA's masked kernels aligned and the number of distinct shapes small
        for torch.compile and CUDA graphs. Meant for CPU tensors in the data path (on a GPU it waits for the
        device); with `device` the result is copied there without blocking: the cut is a view of the (pinned)
        batch, and rounding past the stored length pads on the device.
        """
        if self.text is None or self.text_mask is None:
            return self if device is None else self.to(device, non_blocking=True)
        keep, padded = padding_extent(self.text_mask, multiple)
        stored = min(keep, self.text.shape[1])
        text, mask = self.text[:, :stored], self.text_mask[:, :stored]  # (B, stored, D), (B, stored): views
        labels = self.labels
        if device is not None:
            text, mask = text.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            labels = None if labels is None else labels.to(device, non_blocking=True)
        if not padded:
            return Condition(text=text, text_mask=None, labels=labels)
        extra = keep - stored  # rounding past the stored length: append masked zeros
        if extra:
            text, mask = F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra))
        return Condition(text=text, text_mask=mask, labels=labels)


def padding_extent(mask: torch.Tensor, multiple: int = 1) -> tuple[int, bool]:
    """(keep, padded) of a (B, L) 0-1 padding mask: the positions up to the last real token of any row, rounded up
    to a multiple of `multiple` when some row has padding within them (then padded is True; keep may exceed L)."""
    real = mask.bool()  # (B, L)
    positions = torch.arange(1, real.shape[1] + 1, device=real.device)  # (L,)
    keep = int((real * positions).amax()) if real.numel() else 0
    padded = not bool(real[:, :keep].all())
    return (-(-keep // multiple) * multiple if padded else keep), padded


# --------------------------------------------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------------------------------------------


class SinusoidalTimesteps(nn.Module):
    """Transformer-style sinusoidal embedding of the (integer) timestep, [cos | sin] order as diffusers'
    Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0). With `learnable` the frequencies are a parameter."""

    def __init__(self, dim: int, learnable: bool = False, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        self.dim = dim
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)  # (dim/2,)
        if learnable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs.float()[None, :]  # (B, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * (dim/2))
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------------------
# Transformer2D
# --------------------------------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """Linear to 2 x inner, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> dropout -> linear; `net` indices match diffusers (net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention (when context_dim is set) and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int], mult: int, bias: bool, dropout: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, qkv_bias=bias)
        if context_dim is not None:
            self.norm2 = LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, qkv_bias=bias)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, mult, dropout)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, N, C), context: (B, L, D), mask: (B, L)
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context=context, mask=mask)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm -> proj_in (linear) -> transformer blocks over the H*W tokens -> proj_out, plus the outer residual."""

    def __init__(self, channels: int, heads: int, context_dim: Optional[int], cfg: UNetConfig):
        super().__init__()
        dim_head = channels // heads
        self.norm = group_norm(channels, cfg.groupnorm_groups, 1e-6)  # diffusers fixes eps=1e-6 here
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [
                # no dropout: unet.dropout is the ResNet blocks' only, as in LDM's openaimodel (SpatialTransformer
                # gets none) and diffusers' UNet2DConditionModel (its Transformer2DModels get none)
                BasicTransformerBlock(
                    channels, heads, dim_head, context_dim, cfg.transformer_dim_mult, cfg.attention_bias, 0.0
                )
                for _ in range(cfg.transformer_blocks_per_layer)
            ]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        tokens = self.proj_out(tokens)  # (B, HW, C)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


# --------------------------------------------------------------------------------------------------------------
# UNet blocks
# --------------------------------------------------------------------------------------------------------------


def _heads(channels: int, head_dim: int) -> int:
    """Number of heads of width `head_dim` (one head when the block is narrower than a head, as in tiny tests)."""
    heads = max(1, channels // head_dim)
    if channels % heads:
        raise ValueError(f"unet: {channels} channels do not split into heads of width attention_head_dim={head_dim}")
    return heads


def _run(module: nn.Module, use_checkpoint: bool, *args):
    """Call `module(*args)`, recomputing its activations in the backward pass when `use_checkpoint`."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class DownBlock(nn.Module):
    """n x (ResnetBlock2D [+ Transformer2D]) then an optional Downsample2D. Returns the output and its skips."""

    def __init__(self, in_ch: int, out_ch: int, attention: bool, downsample: bool, temb_dim: int,
                 context_dim: Optional[int], cfg: UNetConfig):
        super().__init__()
        n = cfg.unet_residual_layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg.groupnorm_groups, cfg.norm_eps, temb_dim, cfg.dropout)
             for i in range(n)]
        )
        heads = _heads(out_ch, cfg.attention_head_dim)
        self.attentions = nn.ModuleList(
            [Transformer2D(out_ch, heads, context_dim, cfg) for _ in range(n)] if attention else []
        )
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_ch, cfg.unet_up_down_kernel_size, cfg.unet_up_down_factor)] if downsample else []
        )
        self.gradient_checkpointing = False

    def forward(self, h, temb, context, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        ckpt = self.gradient_checkpointing and self.training
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, ckpt, h, temb)  # (B, out_ch, H, W)
            if len(self.attentions):
                h = _run(self.attentions[i], ckpt, h, context, mask)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)  # (B, out_ch, H / f, W / f)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResnetBlock2D, [Transformer2D], ResnetBlock2D at the lowest resolution."""

    def __init__(self, ch: int, attention: bool, temb_dim: int, context_dim: Optional[int], cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(ch, ch, cfg.groupnorm_groups, cfg.norm_eps, temb_dim, cfg.dropout) for _ in range(2)]
        )
        heads = _heads(ch, cfg.attention_head_dim)
        self.attentions = nn.ModuleList([Transformer2D(ch, heads, context_dim, cfg)] if attention else [])
        self.gradient_checkpointing = False

    def forward(self, h, temb, context, mask) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and self.training
        h = _run(self.resnets[0], ckpt, h, temb)
        for attn in self.attentions:
            h = _run(attn, ckpt, h, context, mask)
        return _run(self.resnets[1], ckpt, h, temb)


class UpBlock(nn.Module):
    """(n + 1) x (ResnetBlock2D on concat[h, skip] [+ Transformer2D]) then an optional Upsample2D."""

    def __init__(self, prev_ch: int, out_ch: int, skip_channels: list[int], attention: bool, upsample: bool,
                 temb_dim: int, context_dim: Optional[int], cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip, out_ch, cfg.groupnorm_groups, cfg.norm_eps,
                           temb_dim, cfg.dropout)
             for i, skip in enumerate(skip_channels)]
        )
        heads = _heads(out_ch, cfg.attention_head_dim)
        self.attentions = nn.ModuleList(
            [Transformer2D(out_ch, heads, context_dim, cfg) for _ in skip_channels] if attention else []
        )
        self.upsamplers = nn.ModuleList(
            [Upsample2D(out_ch, cfg.unet_up_down_kernel_size, cfg.unet_up_down_factor)] if upsample else []
        )
        self.gradient_checkpointing = False

    def forward(self, h, skips: list[torch.Tensor], temb, context, mask) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and self.training
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = _run(resnet, ckpt, h, temb)
            if len(self.attentions):
                h = _run(self.attentions[i], ckpt, h, context, mask)
        for up in self.upsamplers:
            h = up(h)  # (B, out_ch, H * f, W * f)
        return h


# --------------------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """Denoiser model(x_t, t, cond) -> prediction (epsilon or v, as the diffusion process was trained)."""

    def __init__(self, cfg: UNetConfig, in_channels: int, conditioning: str = "none"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
        channels = list(cfg.unet_channels_per_block)
        n_levels = len(channels)
        cfg.check()  # a config built in code, not loaded (from_dict checks at load)
        for name, types, valid in (("down_block_types", cfg.down_block_types, DOWN_TYPES),
                                   ("up_block_types", cfg.up_block_types, UP_TYPES),
                                   ("mid_block_types", [cfg.mid_block_types], MID_TYPES)):
            for block_type in types:
                if block_type not in valid:
                    raise ValueError(f"unet: {name} entry {block_type!r} is not one of {valid}")

        self.config = cfg
        self.in_channels = in_channels
        self.conditioning = conditioning
        self.num_classes = cfg.num_classes
        self.downsample_factor = cfg.unet_up_down_factor ** (n_levels - 1)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        temb_dim = cfg.time_embed_proj_dim
        context_dim = cfg.text_embed_dim if conditioning == "text" else None

        # timestep (+ class) embedding
        self.time_proj = SinusoidalTimesteps(cfg.time_embed_start_dim, learnable=cfg.time_embed_requires_grad)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_start_dim, temb_dim)
        self.class_embedding = None
        self.class_embedding_proj = None
        if conditioning == "class":
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.class_embed_dim)  # last row: null class
            if cfg.class_embed_dim != temb_dim:
                self.class_embedding_proj = nn.Linear(cfg.class_embed_dim, temb_dim)
        self.null_text_embedding = None
        if conditioning == "text":
            # one learned token stands for "no text": the null condition of classifier-free guidance
            self.null_text_embedding = nn.Parameter(torch.randn(1, cfg.text_embed_dim) * 0.02)  # (1, D)

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        # encoder half; skip_channels records the width of every skip connection in push order
        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]
        prev = channels[0]
        for i, (ch, block_type) in enumerate(zip(channels, cfg.down_block_types)):
            last = i == n_levels - 1
            self.down_blocks.append(
                DownBlock(prev, ch, block_type == "AttnDown", not last, temb_dim, context_dim, cfg)
            )
            skip_channels += [ch] * cfg.unet_residual_layers_per_block + ([] if last else [ch])
            prev = ch

        self.mid_block = MidBlock(channels[-1], cfg.mid_block_types == "AttnMid", temb_dim, context_dim, cfg)

        # decoder half: each level consumes n + 1 skips, deepest first
        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        for i, (ch, block_type) in enumerate(zip(reversed_channels, cfg.up_block_types)):
            last = i == n_levels - 1
            n_skips = cfg.unet_residual_layers_per_block + 1
            level_skips = [skip_channels.pop() for _ in range(n_skips)]
            self.up_blocks.append(
                UpBlock(prev, ch, level_skips, block_type == "AttnUp", not last, temb_dim, context_dim, cfg)
            )
            prev = ch

        self.conv_norm_out = group_norm(channels[0], cfg.groupnorm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)

    # ------------------------------------------------------------------------------------------------ setup

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each ResNet / Transformer2D block's activations in the backward pass (less memory)."""
        self.gradient_checkpointing = enabled
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    # ------------------------------------------------------------------------------------------ conditioning

    def null_condition(self, batch_size: int) -> Optional[Condition]:
        """The learned "no condition" for a batch: the null text token, or the null class; None if unconditional."""
        if self.conditioning == "text":
            text = self.null_text_embedding[None].expand(batch_size, -1, -1)  # (B, 1, D)
            return Condition(text=text)  # one real token: no mask
        if self.conditioning == "class":
            device = self.class_embedding.weight.device
            return Condition(labels=torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))
        return None

    def drop_condition(self, cond: Optional[Condition], prob: float,
                       generator: Optional[torch.Generator] = None) -> Optional[Condition]:
        """Swap each sample's condition for the null one with probability `prob` (classifier-free guidance
        training, Ho & Salimans 2022). A dropped text becomes the null token repeated over the whole length, all
        real: attending to L copies of one token gives exactly what attending to it once gives, so the null
        condition adds no padding mask (a batch without padding keeps SDPA's fast unmasked kernel)."""
        if cond is None or self.conditioning == "none":
            return cond
        # no early exit at prob 0: the null token then still takes part in the graph (with zero gradient), which
        # DistributedDataParallel needs to see every parameter used
        batch = cond.batch_size
        device = cond.text.device if cond.text is not None else cond.labels.device
        gen_device = generator.device if generator is not None else device
        drop = (torch.rand(batch, generator=generator, device=gen_device) < prob).to(device)  # (B,) bool
        if self.conditioning == "class":
            null = torch.full_like(cond.labels, self.num_classes)
            return Condition(labels=torch.where(drop, null, cond.labels))
        text = cond.text  # (B, L, D)
        null_text = self.null_text_embedding.to(text.dtype)[None].expand(1, text.shape[1], -1)  # (1, L, D)
        mask = None
        if cond.text_mask is not None:
            mask = torch.where(drop[:, None], torch.ones_like(cond.text_mask), cond.text_mask)  # (B, L)
        return Condition(text=torch.where(drop[:, None, None], null_text, text), text_mask=mask)

    def _embed(self, t: torch.Tensor, cond: Optional[Condition], dtype: torch.dtype) -> torch.Tensor:
        temb = self.time_proj(t).to(dtype)  # (B, start_dim)
        temb = self.time_embedding(temb)  # (B, proj_dim)
        if self.conditioning == "class":
            if cond is None or cond.labels is None:
                raise ValueError("a class-conditional UNet needs cond.labels (use null_condition() for none)")
            cemb = self.class_embedding(cond.labels)  # (B, class_embed_dim)
            if self.class_embedding_proj is not None:
                cemb = self.class_embedding_proj(cemb)
            temb = temb + cemb
        return temb

    # --------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Condition] = None) -> torch.Tensor:
        # x: (B, C, h, w), t: (B,) long (a 0-d t is broadcast), cond: text (B, L, D) + mask (B, L) or labels (B,)
        b, _, height, width = x.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(f"UNet input {height}x{width} is not divisible by its downsample factor {self.downsample_factor}")
        if t.dim() == 0:
            t = t.expand(b)
        dtype = self.conv_in.weight.dtype
        temb = self._embed(t, cond, dtype)  # (B, T)

        context = mask = None
        if self.conditioning == "text":
            if cond is None or cond.text is None:
                raise ValueError("a text-conditional UNet needs cond.text (use null_condition() for none)")
            context = cond.text.to(dtype)  # (B, L, D)
            mask = attention_mask(cond.text_mask)  # (B, 1, 1, L) bool, built once for every cross-attention; or None

        h = self.conv_in(x.to(dtype))  # (B, c0, h, w); samplers hand in float32 even to a bf16/fp16 UNet
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, mask)
            skips += block_skips
        h = self.mid_block(h, temb, context, mask)  # (B, c_last, h / f, w / f)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, mask)  # pops n + 1 skips
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C, h, w)


def build_unet(cfg: UNetConfig, in_channels: int, conditioning: str) -> UNet:
    """The UNet for latents with `in_channels` channels; conditioning "none" | "class" | "text"."""
    return UNet(cfg, in_channels, conditioning)
