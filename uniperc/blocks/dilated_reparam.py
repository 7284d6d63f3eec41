"""UniRepLKNet's Dilated Reparam Block (the ``"dilated_reparam"`` mixer) and the UniRepLKNet block
(the ``"dilated_reparam"`` block) (Ding et al., CVPR 2024).

Train time, the large depthwise K x K conv (+BN) runs beside small dilated depthwise convs (+BN each),
outputs summed; ``reparameterize()`` folds every BN into its conv, turns each dilated k x k kernel at rate
r into its dense r(k-1)+1 equivalent and adds it into the K x K kernel: one conv, same function.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from timm.layers import SEModule
from timm.layers.grn import GlobalResponseNorm

from ..ops import DWConv2d
from ..reparam import dilated_to_dense, fuse_bn, pad_to
from .registry import register_block, register_mixer
from .shell import BlockShell

# Official branch tables: K -> (kernel sizes, dilation rates), the first entry being the non-dilated 5x5.
PUBLISHED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def dilated_branches(kernel_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Branch table (kernel sizes, rates) for a Dilated Reparam Block of size ``kernel_size``.

    The published tables cover K = 5..17. For any other odd K > 17 we extend the pattern of the K >= 11
    tables: a 5x5 at rate 1, the largest odd k with rate 2 that fits (equivalent size 2k-1 <= K), and three
    3x3 branches whose rates are spread evenly from about K/4 to (K-1)/2 - 1 (equivalent sizes from about
    K/2 to K-2) -- sparse long-range taps at growing radii, as in the published tables. Every equivalent
    size r(k-1)+1 is <= K, so each branch folds into the K x K kernel.
    """
    if not isinstance(kernel_size, (int, np.integer)) or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size of the Dilated Reparam Block must be odd, got {kernel_size!r}")
    if kernel_size < 5:
        raise ValueError(f"kernel_size of the Dilated Reparam Block must be >= 5, got {kernel_size}")
    if kernel_size in PUBLISHED_BRANCHES:
        return PUBLISHED_BRANCHES[kernel_size]
    k2 = (kernel_size + 1) // 2
    k2 -= 1 - k2 % 2  # largest odd k with 2(k-1)+1 <= K
    rates = tuple(int(r) for r in np.round(np.linspace((kernel_size - 1) / 4, (kernel_size - 1) / 2 - 1, 3)))
    return (5, k2, 3, 3, 3), (1, 2) + rates


class DilatedReparamBlock(nn.Module):
    """Depthwise K x K conv + BN, plus parallel dilated small depthwise convs + BN, summed.

    State-dict keys follow the official implementation (``lk_origin``, ``origin_bn``,
    ``dil_conv_k{k}_{r}``, ``dil_bn_k{k}_{r}``), so official checkpoints load unchanged.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_sizes, self.dilations = dilated_branches(kernel_size)
        self.kernel_size = kernel_size
        self.lk_origin = DWConv2d(channels, kernel_size, bias=False)
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(self.kernel_sizes, self.dilations):
            setattr(self, f"dil_conv_k{k}_{r}", DWConv2d(channels, k, bias=False, dilation=r))
            setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x):
        if self.deployed:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilations):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def reparameterize(self):
        """Fold all branches and BNs into ``lk_origin`` (with bias)."""
        if self.deployed:
            return
        weight, bias = fuse_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)
        for k, r in zip(self.kernel_sizes, self.dilations):
            w, b = fuse_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, None, getattr(self, f"dil_bn_k{k}_{r}"))
            weight = weight + pad_to(dilated_to_dense(w, r), self.kernel_size)
            bias = bias + b
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        merged = DWConv2d(weight.shape[0], self.kernel_size).to(weight)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        self.lk_origin = merged
        del self.origin_bn


@register_mixer("dilated_reparam")
def dilated_reparam_mixer(dim: int, kernel_size: int) -> nn.Module:
    """UniRepLKNet's spatial mixer: a Dilated Reparam Block for K >= 7, a plain depthwise K x K (no bias: a BN
    follows in the published block) for K in {3, 5}, and an identity for K = 0, as in the official code."""
    if kernel_size not in (0, 3, 5) and (kernel_size < 7 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size of the dilated_reparam mixer must be 0, 3, 5 or an odd K >= 7, "
                         f"got {kernel_size}")
    if kernel_size >= 7:
        return DilatedReparamBlock(dim, kernel_size)
    return DWConv2d(dim, kernel_size, bias=False) if kernel_size else nn.Identity()


@register_block("dilated_reparam")
class UniRepLKNetBlock(BlockShell):
    """``x + drop_path(gamma * BN(Linear(GRN(GELU(Linear(SE(BN(mixer(x)))))))))``.

    The mixer (attribute ``dwconv``, the official name) is by default :func:`dilated_reparam_mixer`; an
    identity mixer (K = 0) drops the BN after it too. SE reduces to dim/4; FFN is ``ffn_ratio`` x.
    """

    own_mixer, mixer_attr = "dilated_reparam", "dwconv"

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, shared=None, mixer: str | None = None,
                 mixer_kwargs: dict | None = None, layer_scale_init_value: float | None = 1e-6,
                 ffn_ratio: float = 4.0):
        super().__init__(dim, kernel_size, drop_path)
        if ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be positive, got {ffn_ratio}")
        self.dwconv = self._make_mixer(mixer, shared, mixer_kwargs)
        self.norm = nn.Identity() if isinstance(self.dwconv, nn.Identity) else nn.BatchNorm2d(dim)
        self.se = SEModule(dim, rd_channels=dim // 4)
        hidden = int(ffn_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, channels_last=True)
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)
        self.pwconv2_bn = nn.BatchNorm2d(dim)
        self.gamma = self._layer_scale(layer_scale_init_value)

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y.permute(0, 2, 3, 1)))))
        y = self.pwconv2_bn(y.permute(0, 3, 1, 2))
        return x + self.drop_path(self._scaled(y, self.gamma))

    @torch.no_grad()
    def reparameterize(self):
        """Fold the mixer's branches and the BN after it into one conv (own mixer; with another mixer that BN
        stays), and GRN bias, ``pwconv2_bn`` and layer scale into ``pwconv2``."""
        if isinstance(self.norm, nn.BatchNorm2d):
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.reparameterize()
                self.dwconv.lk_origin = _fold_bn_into_conv(self.dwconv.lk_origin, self.norm)
                self.norm = nn.Identity()
            elif isinstance(self.dwconv, DWConv2d):
                self.dwconv = _fold_bn_into_conv(self.dwconv, self.norm)
                self.norm = nn.Identity()
        if isinstance(self.pwconv2_bn, nn.BatchNorm2d):
            scale = self.gamma if self.gamma is not None else torch.ones_like(self.pwconv2_bn.weight)
            # GRN's additive bias passes through pwconv2 unchanged: W (z + beta) = W z + W beta
            weight, bias = fuse_bn(self.pwconv2.weight[:, :, None, None], self.pwconv2.weight @ self.grn.bias,
                                   self.pwconv2_bn)
            fused = nn.Linear(self.pwconv2.in_features, self.pwconv2.out_features).to(weight)
            fused.weight.copy_(weight[:, :, 0, 0] * scale[:, None])
            fused.bias.copy_(bias * scale)
            self.pwconv2 = fused
            self.pwconv2_bn = nn.Identity()
            self.gamma = None
            # deploy form has no GRN bias (as the official one): keep a zero, non-persistent buffer in its place
            hidden = self.grn.bias.shape[0]
            del self.grn.bias
            self.grn.register_buffer("bias", weight.new_zeros(hidden), persistent=False)


def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A depthwise conv with bias computing ``bn(conv(x))``, of the same class as ``conv``."""
    weight, bias = fuse_bn(conv.weight, conv.bias, bn)
    channels, k = weight.shape[0], weight.shape[-1]
    fused = (DWConv2d(channels, k) if isinstance(conv, DWConv2d) else
             nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)).to(weight)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused
