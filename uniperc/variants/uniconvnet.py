"""UniConvNet (Wang & Xi, ICCV 2025) variants A..B, registered in timm.

Each variant is :class:`~uniperc.backbone.UniPercNet` with the ``"rfa"`` block (UniConvBlock, whose own
mixer is the RFA; ``mixer=`` puts another spatial mixer in its place), the
UniRepLKNet-style stem (conv3x3 s2 -> LN -> GELU -> conv3x3 s2 -> LN), UniConvNet's LN-then-conv
downsampling and a pooled-LN head, with depths / dims from the official code. The DCNv3 group
width is 8 channels for A..P2 (``group = dim // 8``) and 16 for N0..B (``models_N0-XL``).
Official checkpoints map key for key through :func:`convert_official_uniconvnet`.
"""
from __future__ import annotations


import torch
from timm.models import generate_default_cfgs, register_model

from ..backbone import UniPercNet
from ._builder import adapted_by_timm, build_variant, image_cfg
from ..convert import CONVNEXT_FRAME_RENAMES, prepare_state_dict, register_converter, rename_keys

__all__ = ["checkpoint_filter_fn", "convert_official_uniconvnet"]

_LIGHT = {"rfa": dict(dcn_group_channels=8)}   # models_A-P2: group = dim // 8
_LARGE = {"rfa": dict(dcn_group_channels=16)}  # models_N0-XL: group = dim // 16
MODEL_ARGS = {
    "uniconvnet_a": dict(depths=(2, 3, 9, 2), dims=(24, 48, 96, 192), mixer_kwargs=_LIGHT),
    "uniconvnet_p0": dict(depths=(2, 2, 7, 2), dims=(32, 64, 128, 256), mixer_kwargs=_LIGHT),
    "uniconvnet_p1": dict(depths=(2, 3, 6, 3), dims=(32, 64, 128, 256), mixer_kwargs=_LIGHT),
    "uniconvnet_p2": dict(depths=(3, 3, 11, 3), dims=(32, 64, 128, 256), mixer_kwargs=_LIGHT),
    "uniconvnet_n0": dict(depths=(2, 2, 7, 2), dims=(48, 96, 192, 384), mixer_kwargs=_LARGE),
    "uniconvnet_n1": dict(depths=(2, 2, 8, 3), dims=(48, 96, 192, 384), mixer_kwargs=_LARGE),
    "uniconvnet_n2": dict(depths=(3, 3, 11, 3), dims=(48, 96, 192, 384), mixer_kwargs=_LARGE),
    "uniconvnet_n3": dict(depths=(3, 3, 19, 3), dims=(48, 96, 192, 384), mixer_kwargs=_LARGE),
    "uniconvnet_t": dict(depths=(3, 3, 15, 3), dims=(64, 128, 256, 512), mixer_kwargs=_LARGE),
    "uniconvnet_s": dict(depths=(3, 3, 17, 3), dims=(80, 160, 320, 640), mixer_kwargs=_LARGE),
    "uniconvnet_b": dict(depths=(4, 4, 13, 4), dims=(112, 224, 448, 896), mixer_kwargs=_LARGE),
}

# Official block-internal names that differ from ours: InternImage wraps the channels-last LayerNorms
# and DCNv3's depthwise conv in one-element nn.Sequential containers.
_BLOCK_RENAMES = [(r"\.norm([12])\.0\.", r".norm\1."), (r"\.dcn\.dw_conv\.0\.", ".dcn.dw_conv.")]


@register_converter("uniconvnet")
def convert_official_uniconvnet(state_dict) -> dict[str, torch.Tensor]:
    """Official UniConvNet keys -> uniperc keys (``downsample_layers.0`` is our ``stem``,
    ``downsample_layers.i`` our ``stages.i.downsample``, ``norm``/``head`` our ``head.norm``/``head.fc``)."""
    return rename_keys(state_dict, CONVNEXT_FRAME_RENAMES + _BLOCK_RENAMES)


def checkpoint_filter_fn(state_dict, model):
    """timm ``pretrained_filter_fn``: official or uniperc keys, train-time or deploy form."""
    return prepare_state_dict(model, state_dict, "uniconvnet", ignore=adapted_by_timm(model))


def _create_uniconvnet(variant: str, pretrained: bool = False, **kwargs) -> UniPercNet:
    # kernel_sizes is nominal (the RFA's largest kernel): the RFA ignores it, its kernels are fixed; another
    # mixer (mixer=...) placed in this shell gets it.
    model_args = dict(MODEL_ARGS[variant], block="rfa", mixer=None, kernel_sizes=11, stem="unireplknet",
                      downsample="norm_conv", head_norm="ln")
    return build_variant(variant, pretrained, checkpoint_filter_fn, model_args, **kwargs)


# The official release on the Hugging Face Hub (the ImageNet-1K table of the official README), at 224 px for every
# variant and 384 px for T / S / B.
_HUB_ID = "ai-modelwithcode/UniConvNet"
_IN1K = {"uniconvnet_a": "uniconvnet_a_1k_224.pth", "uniconvnet_p0": "uniconvnet_p0_1k_224_ema.pth",
         "uniconvnet_p1": "uniconvnet_p1_1k_224_ema.pth", "uniconvnet_p2": "uniconvnet_p2_1k_224_ema.pth",
         "uniconvnet_n0": "uniconvnet_n0_1k_224_ema.pth", "uniconvnet_n1": "uniconvnet_n1_1k_224.pth",
         "uniconvnet_n2": "uniconvnet_n2_1k_224_ema.pth", "uniconvnet_n3": "uniconvnet_n3_1k_224_ema.pth",
         "uniconvnet_t": "uniconvnet_t_1k_224_ema.pth", "uniconvnet_s": "uniconvnet_s_1k_224_ema.pth",
         "uniconvnet_b": "uniconvnet_b_1k_224_ema.pth"}
_IN1K_384 = {"uniconvnet_t": "uniconvnet_t_1k_384.pth", "uniconvnet_s": "uniconvnet_s_1k_384.pth",
             "uniconvnet_b": "uniconvnet_b_1k_384.pth"}
default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": image_cfg(hf_hub_id=_HUB_ID, hf_hub_filename=file, license="mit")
       for name, file in _IN1K.items()},
    **{f"{name}.in1k_384": image_cfg(hf_hub_id=_HUB_ID, hf_hub_filename=file, license="mit",
                                     input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
       for name, file in _IN1K_384.items()},
})


@register_model
def uniconvnet_a(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_a", pretrained, **kwargs)


@register_model
def uniconvnet_p0(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_p0", pretrained, **kwargs)


@register_model
def uniconvnet_p1(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_p1", pretrained, **kwargs)


@register_model
def uniconvnet_p2(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_p2", pretrained, **kwargs)


@register_model
def uniconvnet_n0(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_n0", pretrained, **kwargs)


@register_model
def uniconvnet_n1(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_n1", pretrained, **kwargs)


@register_model
def uniconvnet_n2(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_n2", pretrained, **kwargs)


@register_model
def uniconvnet_n3(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_n3", pretrained, **kwargs)


@register_model
def uniconvnet_t(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_t", pretrained, **kwargs)


@register_model
def uniconvnet_s(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_s", pretrained, **kwargs)


@register_model
def uniconvnet_b(pretrained=False, **kwargs) -> UniPercNet:
    return _create_uniconvnet("uniconvnet_b", pretrained, **kwargs)
