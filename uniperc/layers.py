"""Stems and downsampling layers, chosen by name so each family brings its own frame."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from ._registry import register_into

_STEMS: dict[str, Callable[[int, int], nn.Module]] = {}
_DOWNSAMPLES: dict[str, Callable[[int, int], nn.Module]] = {}


def register_stem(name: str):
    """Decorator for ``fn(in_chans, out_dim) -> nn.Module`` with total stride 4."""
    return register_into(_STEMS, "stem", name)


def register_downsample(name: str):
    """Decorator for ``fn(in_dim, out_dim) -> nn.Module`` with stride 2."""
    return register_into(_DOWNSAMPLES, "downsample", name)


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; registered: {sorted(table)}") from None


def create_stem(name: str, in_chans: int, out_dim: int) -> nn.Module:
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    return _lookup(_STEMS, "stem", name)(in_chans, out_dim)


def create_downsample(name: str, in_dim: int, out_dim: int) -> nn.Module:
    return _lookup(_DOWNSAMPLES, "downsample", name)(in_dim, out_dim)


class StridedConv2d(nn.Conv2d):
    """A zero-padded strided ``nn.Conv2d`` (same parameters and state-dict keys) that pads explicitly when the
    input is smaller than the kernel.

    Why: PyTorch's CPU bfloat16 weight gradient of a strided convolution on a 1x1 input reads uninitialised
    memory for the taps that see only padding (NaN or garbage there, in most fresh processes; measured with
    torch 2.14 for a 3x3 stride-2 conv under ``torch.autocast("cpu", torch.bfloat16)``), which a deep stage of a
    small input meets. Padding with real zeros first gives every tap real data; larger inputs take the
    ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or min(x.shape[-2:]) >= max(self.kernel_size):
            return super().forward(x)
        ph, pw = self.padding
        return F.conv2d(F.pad(x, (pw, pw, ph, ph)), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


@register_stem("unireplknet")
def unireplknet_stem(in_chans: int, out_dim: int) -> nn.Module:
    """UniRepLKNet / UniConvNet stem: conv3x3 s2 -> LN -> GELU -> conv3x3 s2 -> LN."""
    return nn.Sequential(
        StridedConv2d(in_chans, out_dim // 2, 3, stride=2, padding=1),
        LayerNorm2d(out_dim // 2),
        nn.GELU(),
        StridedConv2d(out_dim // 2, out_dim, 3, stride=2, padding=1),
        LayerNorm2d(out_dim),
    )


@register_downsample("conv_norm")
def conv_norm_downsample(in_dim: int, out_dim: int) -> nn.Module:
    """UniRepLKNet: conv3x3 s2 then LN."""
    return nn.Sequential(StridedConv2d(in_dim, out_dim, 3, stride=2, padding=1), LayerNorm2d(out_dim))


@register_downsample("norm_conv")
def norm_conv_downsample(in_dim: int, out_dim: int) -> nn.Module:
    """UniConvNet: LN then conv3x3 s2."""
    return nn.Sequential(LayerNorm2d(in_dim), StridedConv2d(in_dim, out_dim, 3, stride=2, padding=1))
