"""Structural re-parameterisation: fold train-time branches into deploy form."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights


def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` as a single conv (eval-mode BN statistics)."""
    w, b = fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return w.detach(), b.detach()


def dilated_to_dense(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """A ``k x k`` kernel at rate ``r`` as the equivalent dense ``r(k-1)+1`` kernel (zeros between taps).

    A transposed conv with a 1x1 ones kernel at stride ``r`` inserts exactly ``r - 1`` zeros between taps.
    """
    if dilation == 1:
        return kernel
    # (C, 1, k, k) is read as a batch of C one-channel images
    return F.conv_transpose2d(kernel, kernel.new_ones(1, 1, 1, 1), stride=dilation)


@torch.no_grad()
def scale_output_(layer: nn.Conv2d | nn.Linear, scale: torch.Tensor) -> None:
    """Make ``layer(x)`` compute ``scale * layer(x)`` per output channel, in place (folds a layer scale)."""
    layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(scale)


def pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd kernel to ``size x size``."""
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (p, p, p, p)) if p else kernel


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every re-parameterisable module of ``model`` into deploy form, in place; returns ``model``.

    Calls ``reparameterize()`` on each module that has one, parents before children (the order
    ``timm.utils.reparameterize_model`` uses), so a block can fold its own children first.
    """
    for module in list(model.modules()):
        fold = getattr(module, "reparameterize", None)
        if callable(fold):
            fold()
    return model
