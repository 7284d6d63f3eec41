"""PeLK (Chen et al., CVPR 2024) variants T / S / B and B-101, registered in timm.

Each variant is :class:`~uniperc.backbone.UniPercNet` with the ``"peripheral"`` block
(:mod:`uniperc.blocks.peripheral`; ``mixer=`` swaps only its spatial mixer) in the ConvNeXt/SLaK frame:
a 4x4 stride-4 conv + LN stem, LN + 2x2 stride-2 conv downsampling, global pooling -> LN -> linear head.

Our reading of the paper (no official code exists):

* depths T (3, 3, 9, 3), S/B (3, 3, 27, 3); kernels (51, 49, 47, 13), PeLK-101 (101, 69, 67, 13) with a
  7x7 central region (5x5 otherwise);
* widths: PeLK follows SLaK's 1.3x width with 40 % dynamic sparsity. Dynamic sparsity (prune-and-regrow
  during training) is a training procedure, not an architecture, and we do not implement it. A 1.3x-wide
  model keeps ~1.3^2 x 0.6 = 1.01 of the weights of a 1x-wide one, so the paper's parameter counts (29M /
  50M / 89M / 90M, non-zero weights) are those of a dense model at ConvNeXt's widths: T/S 96..768,
  B 128..1024. That is what we build; the counts match to < 1 % (``tests/test_peripheral.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models import generate_default_cfgs, register_model

from ..backbone import UniPercNet
from ._builder import adapted_by_timm, build_variant, image_cfg
from ..convert import prepare_state_dict, register_converter
from ..layers import register_downsample, register_stem

__all__ = ["checkpoint_filter_fn", "convert_pelk"]


@register_stem("pelk")
def pelk_stem(in_chans: int, out_dim: int) -> nn.Module:
    """ConvNeXt/SLaK patchify stem: conv 4x4 stride 4, then LN."""
    return nn.Sequential(nn.Conv2d(in_chans, out_dim, 4, stride=4), LayerNorm2d(out_dim, eps=1e-6))


@register_downsample("pelk")
def pelk_downsample(in_dim: int, out_dim: int) -> nn.Module:
    """ConvNeXt/SLaK downsampling: LN, then conv 2x2 stride 2."""
    return nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, 2, stride=2))


_TINY, _DEEP = (3, 3, 9, 3), (3, 3, 27, 3)
_KERNELS, _KERNELS_101 = (51, 49, 47, 13), (101, 69, 67, 13)
MODEL_ARGS = {
    "pelk_t": dict(depths=_TINY, dims=(96, 192, 384, 768), kernel_sizes=_KERNELS),
    "pelk_s": dict(depths=_DEEP, dims=(96, 192, 384, 768), kernel_sizes=_KERNELS),
    "pelk_b": dict(depths=_DEEP, dims=(128, 256, 512, 1024), kernel_sizes=_KERNELS),
    "pelk_b_101": dict(depths=_DEEP, dims=(128, 256, 512, 1024), kernel_sizes=_KERNELS_101,
                       mixer_kwargs={"peripheral": dict(central_region=7)}),
}
# Paper: params (M) / FLOPs (G) / ImageNet-1K top-1 (%) at 224 px
PAPER_RESULTS = {"pelk_t": (29, 5.6, 82.6), "pelk_s": (50, 10.7, 83.9), "pelk_b": (89, 18.3, 84.2),
                 "pelk_b_101": (90, None, None)}


@register_converter("pelk")
def convert_pelk(state_dict) -> dict[str, torch.Tensor]:
    """PeLK has no official release: uniperc's layout is the only one, so keys pass through unchanged and
    a foreign checkpoint is reported key by key by :func:`uniperc.convert.prepare_state_dict`."""
    return dict(state_dict)


def checkpoint_filter_fn(state_dict, model):
    """timm ``pretrained_filter_fn``: uniperc-format checkpoints, train-time or deploy form."""
    return prepare_state_dict(model, state_dict, "pelk", ignore=adapted_by_timm(model))


def _create_pelk(variant: str, pretrained: bool = False, **kwargs) -> UniPercNet:
    model_args = dict(MODEL_ARGS[variant], block="peripheral", mixer=None, stem="pelk", downsample="pelk",
                      head_norm="ln")
    return build_variant(variant, pretrained, checkpoint_filter_fn, model_args, **kwargs)


# PeLK has no official code or weights release: no URL to name.
default_cfgs = generate_default_cfgs({f"{name}.untrained": image_cfg(license="apache-2.0") for name in MODEL_ARGS})


@register_model
def pelk_t(pretrained=False, **kwargs) -> UniPercNet:
    return _create_pelk("pelk_t", pretrained, **kwargs)


@register_model
def pelk_s(pretrained=False, **kwargs) -> UniPercNet:
    return _create_pelk("pelk_s", pretrained, **kwargs)


@register_model
def pelk_b(pretrained=False, **kwargs) -> UniPercNet:
    return _create_pelk("pelk_b", pretrained, **kwargs)


@register_model
def pelk_b_101(pretrained=False, **kwargs) -> UniPercNet:
    return _create_pelk("pelk_b_101", pretrained, **kwargs)
