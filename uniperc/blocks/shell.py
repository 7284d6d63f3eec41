"""What every block shares: a spatial mixer from the registry inside a published shell.

A block is shell + mixer (MetaFormer-style): the shell is the published block's pre/post norms, channel MLP
(with SE / GRN / DCN where published), layer scales and drop path; the spatial mixer is a component built
by name (:func:`~uniperc.blocks.registry.create_mixer`). Each published block is a preset of this class:
its own layers under the official attribute names (so official checkpoints keep loading), its own mixer by
default (``own_mixer``), and any other registered mixer in the mixer's place (``mixer=``), under the same
attribute (``mixer_attr``). Re-parameterisation folds what the mixer allows exactly and keeps the rest:
a layer scale folds into a mixer with ``scale_output_``, a pre-norm BN into one with ``absorb_input_affine_``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..reparam import fuse_bn, scale_output_
from .registry import create_mixer


class BlockShell(nn.Module):
    """Base of the block presets: holds the mixer, the drop path and the layer-scale helpers.

    Layer scales are 1-D parameters (``None`` once folded); their attribute names are the published ones
    (UniRepLKNet ``gamma``, UniConvNet ``layer_scale``/``gamma1``/``gamma2``, VAN ``layer_scale_1``/``_2``)
    because official checkpoints use them; PeLK, which has no official checkpoint, uses the default ``gamma``.
    """

    own_mixer: str  # the mixer the block was published with
    mixer_attr: str  # attribute (and state-dict prefix) of the mixer, as in the published block

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size  # as configured; mixers with fixed kernels ignore it
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _make_mixer(self, mixer: str | None, shared, mixer_kwargs: dict | None) -> nn.Module:
        return create_mixer(mixer or self.own_mixer, self.dim, self.kernel_size, shared, **(mixer_kwargs or {}))

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_attr)

    def _layer_scale(self, init_value: float | None) -> nn.Parameter | None:
        return nn.Parameter(torch.full((self.dim,), float(init_value))) if init_value else None

    @staticmethod
    def _scaled(y: torch.Tensor, scale: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
        if scale is None:
            return y
        return y * (scale if channels_last else scale.view(1, -1, 1, 1))

    @torch.no_grad()
    def _fold_layer_scale(self, name: str, layer: nn.Module) -> None:
        """Fold layer scale ``name`` into ``layer`` (a conv / linear, or a mixer with ``scale_output_``)."""
        scale = getattr(self, name)
        if scale is None:
            return
        if hasattr(layer, "scale_output_"):
            layer.scale_output_(scale)
        elif isinstance(layer, (nn.Conv2d, nn.Linear)):
            scale_output_(layer, scale)
        else:
            return  # nothing exact to fold into: the scale stays a parameter
        setattr(self, name, None)

    @torch.no_grad()
    def _fold_input_norm(self, name: str, layer: nn.Module) -> None:
        """Fold eval-mode BN ``name`` into the ``layer`` after it, when that layer can absorb it exactly."""
        bn = getattr(self, name)
        if isinstance(bn, nn.BatchNorm2d) and hasattr(layer, "absorb_input_affine_"):
            layer.absorb_input_affine_(*bn_affine(bn))
            setattr(self, name, nn.Identity())


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``scale * x + shift`` per channel."""
    scale, shift = fuse_bn(torch.ones_like(bn.running_mean).view(-1, 1), None, bn)
    return scale.view(-1), shift


@torch.no_grad()
def absorb_affine_into_pw_(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make 1x1 ``conv(x)`` compute ``conv(scale * x + shift)`` (no padding: exact)."""
    conv.bias.add_(conv.weight[:, :, 0, 0] @ shift)
    conv.weight.mul_(scale.view(1, -1, 1, 1))
