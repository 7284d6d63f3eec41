"""Official checkpoints -> uniperc state dicts, one converter per model family."""
from __future__ import annotations

import copy
import re
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ._registry import register_into
from .reparam import reparameterize

_CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {}

# The ConvNeXt-style frame of the official UniRepLKNet and UniConvNet code: ``downsample_layers.0`` is our
# stem, ``downsample_layers.i`` our ``stages.i.downsample``, ``stages.i.j`` our ``stages.i.blocks.j``, and
# the final ``norm`` / ``head`` our ``head.norm`` / ``head.fc``.
CONVNEXT_FRAME_RENAMES = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """Apply ``re.sub(pattern, repl, key)`` for each rule, in order, to every key."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def register_converter(family: str):
    """Decorator for ``fn(official_state_dict) -> uniperc_state_dict`` (key renames and reshapes)."""
    return register_into(_CONVERTERS, "checkpoint family", family)


def _unwrap(state_dict: Mapping) -> Mapping[str, torch.Tensor]:
    """Official checkpoints nest the weights under 'model' / 'state_dict' / 'model_ema'."""
    for key in ("model", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            return state_dict[key]
    return state_dict


def convert_checkpoint(state_dict: Mapping, family: str) -> dict[str, torch.Tensor]:
    """Map an official implementation's state dict (train-time or deploy form) onto uniperc's keys."""
    if family not in _CONVERTERS:
        raise ValueError(f"unknown checkpoint family {family!r}; known: {sorted(_CONVERTERS)}")
    return _CONVERTERS[family](_unwrap(state_dict))


def _key_report(expected: Mapping, given: Mapping) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        parts.append("shape mismatches: " + ", ".join(
            f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes[:20]))
    return "; ".join(parts)


def prepare_state_dict(model: nn.Module, state_dict: Mapping, family: str,
                       ignore: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Convert ``state_dict`` for ``model`` and check it fits exactly.

    Accepts official or uniperc keys. A deploy-form checkpoint for a train-form model reparameterises the
    model first (in place), so it has the structure the weights were saved from. Raises ``ValueError``
    naming the missing / unexpected / mis-shaped keys. Keys starting with a prefix in ``ignore`` are left
    out of the check (timm's ``load_pretrained`` drops or adapts them after its filter).
    """
    ignore = tuple(ignore)

    def checked(state: Mapping) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(ignore)}

    state_dict = dict(_unwrap(state_dict))
    own = checked(model.state_dict())
    deployed = None
    if set(checked(state_dict)) - set(own):
        deployed = checked(reparameterize(copy.deepcopy(model)).state_dict())
        if set(checked(state_dict)) - set(deployed):  # neither our train nor our deploy keys: official names
            state_dict = convert_checkpoint(state_dict, family)
    if set(checked(state_dict)) != set(own):
        deployed = deployed if deployed is not None else checked(reparameterize(copy.deepcopy(model)).state_dict())
        if set(checked(state_dict)) == set(deployed):
            reparameterize(model)
            own = deployed
    report = _key_report(own, checked(state_dict))
    if report:
        raise ValueError(f"checkpoint does not fit {type(model).__name__} ({family}): {report}")
    return state_dict


def load_converted(model: nn.Module, state_dict: Mapping, family: str) -> nn.Module:
    """Load an official (or uniperc) checkpoint into ``model`` strictly; returns ``model``."""
    model.load_state_dict(prepare_state_dict(model, state_dict, family), strict=True)
    return model
