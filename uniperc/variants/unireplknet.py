"""UniRepLKNet (Ding et al., CVPR 2024) variants A..XL, registered in timm.

Each variant is :class:`~uniperc.backbone.UniPercNet` with the UniRepLKNet block around the Dilated Reparam
mixer (``mixer=`` swaps only the spatial mixer), the published
depths / dims / per-block kernel sizes, and official checkpoints mapped by :func:`checkpoint_filter_fn`.
"""
from __future__ import annotations


import torch
from timm.models import generate_default_cfgs, register_model

from ..backbone import UniPercNet
from ._builder import adapted_by_timm, build_variant, image_cfg
from ..convert import CONVNEXT_FRAME_RENAMES, prepare_state_dict, register_converter, rename_keys

__all__ = ["checkpoint_filter_fn"]


def _kernels(depths: tuple[int, ...], stage3: tuple[int, ...]) -> tuple:
    """Stage 1 all 3x3; stages 2 and 4 all 13; stage 3 cycles ``stage3``."""
    return ((3,) * depths[0], (13,) * depths[1],
            tuple(stage3[i % len(stage3)] for i in range(depths[2])), (13,) * depths[3])


_SMALL = (2, 2, 6, 2)
_DEEP = (3, 3, 27, 3)
MODEL_ARGS = {
    "unireplknet_a": dict(depths=_SMALL, dims=(40, 80, 160, 320), kernel_sizes=_kernels(_SMALL, (13,))),
    "unireplknet_f": dict(depths=_SMALL, dims=(48, 96, 192, 384), kernel_sizes=_kernels(_SMALL, (13,))),
    "unireplknet_p": dict(depths=_SMALL, dims=(64, 128, 256, 512), kernel_sizes=_kernels(_SMALL, (13,))),
    "unireplknet_n": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), kernel_sizes=_kernels((2, 2, 8, 2), (13,))),
    "unireplknet_t": dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640),
                          kernel_sizes=_kernels((3, 3, 18, 3), (13, 3))),
    "unireplknet_s": dict(depths=_DEEP, dims=(96, 192, 384, 768), kernel_sizes=_kernels(_DEEP, (13, 3, 3))),
    "unireplknet_b": dict(depths=_DEEP, dims=(128, 256, 512, 1024), kernel_sizes=_kernels(_DEEP, (13, 3, 3))),
    "unireplknet_l": dict(depths=_DEEP, dims=(192, 384, 768, 1536), kernel_sizes=_kernels(_DEEP, (13, 3, 3))),
    "unireplknet_xl": dict(depths=_DEEP, dims=(256, 512, 1024, 2048), kernel_sizes=_kernels(_DEEP, (13, 3, 3))),
}

_BLOCK_RENAMES = [
    (r"\.se\.down\.", ".se.fc1."), (r"\.se\.up\.", ".se.fc2."), (r"\.pwconv1\.1\.", ".pwconv1."),
    (r"\.act\.1\.gamma$", ".grn.weight"), (r"\.act\.1\.beta$", ".grn.bias"),
    (r"\.pwconv2\.0\.", ".pwconv2."), (r"\.pwconv2\.2\.", ".pwconv2_bn."),
]


@register_converter("unireplknet")
def convert_official_unireplknet(state_dict) -> dict[str, torch.Tensor]:
    """Official UniRepLKNet keys (train-time or deploy) -> uniperc keys."""
    out = rename_keys(state_dict, CONVNEXT_FRAME_RENAMES + _BLOCK_RENAMES)
    for key in [k for k in out if k.endswith((".grn.weight", ".grn.bias"))]:
        out[key] = out[key].reshape(-1)  # official GRN keeps (1, 1, 1, C)
    return out


def checkpoint_filter_fn(state_dict, model):
    """timm ``pretrained_filter_fn``: official or uniperc, train-time or deploy form."""
    return prepare_state_dict(model, state_dict, "unireplknet", ignore=adapted_by_timm(model))


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniPercNet:
    model_args = dict(MODEL_ARGS[variant], block="dilated_reparam", mixer=None, stem="unireplknet",
                      downsample="conv_norm")
    return build_variant(variant, pretrained, checkpoint_filter_fn, model_args, **kwargs)


# The official release on the Hugging Face Hub (``huggingface_file_names`` of the official unireplknet.py): ImageNet-1K
# models at 224 px for A..S, ImageNet-22K -> 1K fine-tunes at 384 px for S..XL. (The ImageNet-22K pretraining
# checkpoints are left out: their head size is not stated there.)
_HUB_ID = "DingXiaoH/UniRepLKNet"
_IN1K = {"unireplknet_a": "unireplknet_a_in1k_224_acc77.03.pth", "unireplknet_f": "unireplknet_f_in1k_224_acc78.58.pth",
         "unireplknet_p": "unireplknet_p_in1k_224_acc80.23.pth", "unireplknet_n": "unireplknet_n_in1k_224_acc81.64.pth",
         "unireplknet_t": "unireplknet_t_in1k_224_acc83.21.pth", "unireplknet_s": "unireplknet_s_in1k_224_acc83.91.pth"}
_IN22K_FT_IN1K_384 = {"unireplknet_s": "unireplknet_s_in22k_to_in1k_384_acc86.44.pth",
                      "unireplknet_b": "unireplknet_b_in22k_to_in1k_384_acc87.40.pth",
                      "unireplknet_l": "unireplknet_l_in22k_to_in1k_384_acc87.88.pth",
                      "unireplknet_xl": "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth"}
default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": image_cfg(hf_hub_id=_HUB_ID, hf_hub_filename=file, license="apache-2.0")
       for name, file in _IN1K.items()},
    **{f"{name}.in22k_ft_in1k_384": image_cfg(hf_hub_id=_HUB_ID, hf_hub_filename=file, license="apache-2.0",
                                              input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
       for name, file in _IN22K_FT_IN1K_384.items()},
})


@register_model
def unireplknet_a(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_a", pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_f", pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_p", pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_n", pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_t", pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_s", pretrained, **kwargs)


@register_model
def unireplknet_b(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_b", pretrained, **kwargs)


@register_model
def unireplknet_l(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_l", pretrained, **kwargs)


@register_model
def unireplknet_xl(pretrained=False, **kwargs) -> UniPercNet:
    return _create_unireplknet("unireplknet_xl", pretrained, **kwargs)
