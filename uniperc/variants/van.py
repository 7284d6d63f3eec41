"""VAN (Guo et al., "Visual Attention Network", 2022) variants b0..b3, registered in timm.

Each variant is :class:`~uniperc.backbone.UniPercNet` with the ``"lka"`` block
(:mod:`uniperc.blocks.lka`; ``mixer=`` swaps only its spatial mixer) in VAN's frame: a 7x7 stride-4 conv + BN stem (official ``patch_embed1``),
3x3 stride-2 conv + BN downsampling (``patch_embed2..4``), a LayerNorm closing each stage (``norm1..4``),
and global average pooling -> linear head with no norm in between. Official checkpoints map key for key
(:func:`convert_official_van`).

timm itself registers no ``van*`` model, so the variants use the plain names ``van_b0`` .. ``van_b3``.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..backbone import UniPercNet
from ._builder import adapted_by_timm, build_variant, image_cfg
from ..convert import prepare_state_dict, register_converter, rename_keys
from ..layers import StridedConv2d, register_downsample, register_stem
from ..reparam import fuse_bn

__all__ = ["checkpoint_filter_fn", "convert_official_van"]


class ConvBN(nn.Sequential):
    """``BN(conv(x))`` as ``Sequential(conv, bn)`` (official ``OverlapPatchEmbed``: ``proj``, ``norm``);
    ``reparameterize()`` folds the BN into the conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int):
        super().__init__(StridedConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2),
                         nn.BatchNorm2d(out_ch))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self[1], nn.BatchNorm2d):
            weight, bias = fuse_bn(self[0].weight, self[0].bias, self[1])
            self[0].weight.copy_(weight)
            self[0].bias.copy_(bias)
            self[1] = nn.Identity()


@register_stem("van")
def van_stem(in_chans: int, out_dim: int) -> nn.Module:
    """VAN's overlapping patch embedding: conv 7x7 stride 4 (padding 3) + BN."""
    return ConvBN(in_chans, out_dim, 7, 4)


@register_downsample("van")
def van_downsample(in_dim: int, out_dim: int) -> nn.Module:
    """VAN's stage transition: conv 3x3 stride 2 (padding 1) + BN."""
    return ConvBN(in_dim, out_dim, 3, 2)


_MLP_RATIOS = (8, 8, 4, 4)
_WIDE = (64, 128, 320, 512)
MODEL_ARGS = {
    "van_b0": dict(depths=(3, 3, 5, 2), dims=(32, 64, 160, 256)),
    "van_b1": dict(depths=(2, 2, 4, 2), dims=_WIDE),
    "van_b2": dict(depths=(3, 3, 12, 3), dims=_WIDE),
    "van_b3": dict(depths=(3, 5, 27, 3), dims=_WIDE),
}
# Paper / official code: params (M, 1000 classes) and ImageNet-1K top-1 (%)
PAPER_RESULTS = {"van_b0": (4.106, 75.4), "van_b1": (13.862, 81.1), "van_b2": (26.578, 82.8),
                 "van_b3": (44.766, 83.9)}

_RENAMES = [
    (r"^patch_embed1\.proj\.", "stem.0."),
    (r"^patch_embed1\.norm\.", "stem.1."),
    (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.0."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.1."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


@register_converter("van")
def convert_official_van(state_dict) -> dict[str, torch.Tensor]:
    """Official VAN keys (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``head``) -> uniperc keys."""
    return rename_keys(state_dict, _RENAMES)


def checkpoint_filter_fn(state_dict, model):
    """timm ``pretrained_filter_fn``: official or uniperc, train-time or deploy form."""
    return prepare_state_dict(model, state_dict, "van", ignore=adapted_by_timm(model))


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> UniPercNet:
    model_args = dict(MODEL_ARGS[variant], block="lka", mixer=None, kernel_sizes=21,  # LKA's receptive field
                      mixer_kwargs=[{"lka": dict(mlp_ratio=r)} for r in _MLP_RATIOS],
                      stem="van", downsample="van", stage_norm="ln", head_norm=None)
    return build_variant(variant, pretrained, checkpoint_filter_fn, model_args, **kwargs)


# The official ImageNet-1K release (``model_urls`` of the official VAN-Classification code).
_URLS = {
    "van_b0": "https://huggingface.co/Visual-Attention-Network/VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar",
    "van_b1": "https://huggingface.co/Visual-Attention-Network/VAN-Small-original/resolve/main/van_small_811.pth.tar",
    "van_b2": "https://huggingface.co/Visual-Attention-Network/VAN-Base-original/resolve/main/van_base_828.pth.tar",
    "van_b3": "https://huggingface.co/Visual-Attention-Network/VAN-Large-original/resolve/main/van_large_839.pth.tar",
}
default_cfgs = generate_default_cfgs({f"{name}.in1k": image_cfg(url=_URLS[name], license="apache-2.0")
                                      for name in MODEL_ARGS})


@register_model
def van_b0(pretrained=False, **kwargs) -> UniPercNet:
    return _create_van("van_b0", pretrained, **kwargs)


@register_model
def van_b1(pretrained=False, **kwargs) -> UniPercNet:
    return _create_van("van_b1", pretrained, **kwargs)


@register_model
def van_b2(pretrained=False, **kwargs) -> UniPercNet:
    return _create_van("van_b2", pretrained, **kwargs)


@register_model
def van_b3(pretrained=False, **kwargs) -> UniPercNet:
    return _create_van("van_b3", pretrained, **kwargs)
