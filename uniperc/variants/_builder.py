"""What every family file shares: the build call and the ImageNet default config."""
from __future__ import annotations

from typing import Callable

from timm.models import build_model_with_cfg

from ..backbone import UniPercNet


def build_variant(variant: str, pretrained: bool, filter_fn: Callable, model_args: dict, **kwargs) -> UniPercNet:
    """``build_model_with_cfg`` for :class:`UniPercNet`; user ``kwargs`` override the family's ``model_args``."""
    return build_model_with_cfg(
        UniPercNet, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(model_args, **kwargs))


def adapted_by_timm(model) -> tuple[str, ...]:
    """What timm's ``load_pretrained`` replaces after the ``pretrained_filter_fn``, so the filter must not
    demand it fit: the classifier for another ``num_classes``, the first conv's weight for other ``in_chans``."""
    cfg = model.pretrained_cfg
    out = ()
    if model.num_classes != cfg.get("num_classes"):
        out += (cfg["classifier"] + ".",)
    if model.in_chans != cfg["input_size"][0]:
        out += (cfg["first_conv"] + ".weight",)
    return out


def image_cfg(**kwargs) -> dict:
    """timm ``pretrained_cfg`` for a 224x224 ImageNet-1K classifier; ``kwargs`` name where its official weights
    are published (``url``, or ``hf_hub_id`` + ``hf_hub_filename``) and override the defaults. Official files
    are official-format checkpoints: ``pretrained=True`` maps them through the family's ``pretrained_filter_fn``."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.0", "classifier": "head.fc", **kwargs}
