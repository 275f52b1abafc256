"""Building blocks shared by the autoencoder and the UNet.

Each block's parameters map one-to-one onto its diffusers counterpart (ResnetBlock2D, Downsample2D,
Upsample2D, Attention), so converting weights is a matter of renaming keys. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _in_compute_dtype(x: torch.Tensor) -> bool:
    """True for a half-precision activation under autocast: the case in which CUDA autocast would upcast a norm."""
    return x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type)


def _like(p: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if p is None else p.to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises a bf16/fp16 activation in its own dtype under autocast.

    CUDA autocast runs group_norm in float32: every half-precision activation was copied to fp32, normalised,
    passed through SiLU in fp32 and copied back by the next convolution, in the forward and again in the
    backward pass. The kernels already accumulate a half-precision input's statistics in float32, so running
    them on the input's dtype only moves where the output is rounded to the precision the next layer computes
    in anyway. Measured on an H200 (design UNet, bf16, batch 64; README, "Speed on a GPU"): the step 168.0 ->
    158.9 ms, peak memory 33.3 -> 28.8 GiB. Outside autocast, or for a float32 input, this is nn.GroupNorm; the
    parameters stay float32 (cast per call, like autocast's weight casts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _in_compute_dtype(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _like(self.weight, x), _like(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises a bf16/fp16 activation in its own dtype under autocast (see GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _in_compute_dtype(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps)


def group_norm(channels: int, groups: int, eps: float) -> GroupNorm:
    """GroupNorm with `groups` clipped so it always divides `channels` (tiny test configs)."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels, eps=eps, affine=True)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time embedding), GroupNorm -> SiLU -> dropout -> conv, plus skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 32,
        eps: float = 1e-6,
        temb_channels: Optional[int] = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: (B, C_in, H, W), temb: (B, T)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Strided conv. `asymmetric_pad` pads right/bottom only (the autoencoder's choice in LDM and diffusers)."""

    def __init__(self, channels: int, kernel_size: int = 3, factor: int = 2, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        padding = 0 if asymmetric_pad else kernel_size // 2
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=factor, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            pad = self.conv.kernel_size[0] - self.conv.stride[0]
            x = F.pad(x, (0, pad, 0, pad))
        return self.conv(x)  # (B, C, H / factor, W / factor)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling followed by a conv."""

    def __init__(self, channels: int, kernel_size: int = 3, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 nearest upsampling runs on CPU and CUDA since torch 2.1 (diffusers still upcasts to fp32 for older ones)
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))  # (B, C, H * factor, W * factor)


def attention_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (B, L) 0-1 padding mask as SDPA's boolean (B, 1, 1, L) (True = attend); 4-d masks and None pass through."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.bool()[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention over token sequences (self-attention, or cross-attention when `context` is given).

    `mask` marks real (1 / True) and padding (0 / False) context tokens: (B, L_ctx) 0-1, or already the boolean
    (B, 1, 1, L_ctx) that SDPA takes (`attention_mask`, built once per forward by the caller). Without a mask
    SDPA can pick its fastest (flash) kernel; self-attention never takes one.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 1,
        dim_head: int = 64,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # x: (B, N, D), context: (B, L, D_ctx), mask: (B, L)
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, L, d)
        attn_mask = attention_mask(mask)  # (B, 1, 1, L) or None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, h*d)
        return self.to_out(out)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (the autoencoder's mid block).

    Matches diffusers' `Attention(..., heads=1, norm_num_groups=..., residual_connection=True)` in the VAE.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6, residual: bool = True):
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.attn = Attention(channels, heads=1, dim_head=channels, qkv_bias=True)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out if self.residual else out
