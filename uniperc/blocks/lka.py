"""VAN's Large Kernel Attention and block (Guo et al., "Visual Attention Network", 2022).

LKA decomposes a 21 x 21 depthwise conv into a 5 x 5 depthwise conv (local), a 7 x 7 depthwise conv at
dilation 3 (long range, 19 x 19 span; 5 + 19 - 1 = 23 >= 21) and a 1 x 1 conv (channels), and uses the
result as an attention map: ``LKA(u) = u * conv1x1(dw7x7_d3(dw5x5(u)))``.

The ``"lka"`` mixer is ``Attn``; the ``"lka"`` block (official layout) is ``x + dp(ls1 * Attn(BN(x)))``,
``x + dp(ls2 * MLP(BN(x)))`` with ``Attn(z) = proj_2(LKA(GELU(proj_1(z)))) + z`` and
``MLP = fc2(GELU(dw3x3(fc1(z))))``; layer scales start at 1e-2. Sub-module names follow the official code (``attn.proj_1``, ``attn.spatial_gating_unit.conv0``,
...) except ``mlp.dwconv``, which the official code nests one level deeper (``mlp.dwconv.dwconv``).

The kernel sizes are fixed by the design, so the mixer accepts and ignores the backbone's ``kernel_size``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import DWConv2d
from ..reparam import scale_output_
from .registry import register_block, register_mixer
from .shell import BlockShell, absorb_affine_into_pw_


def _pw(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1)


class LargeKernelAttention(nn.Module):
    """``u * conv1(conv_spatial(conv0(u)))`` (official ``AttentionModule``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = DWConv2d(dim, 5)
        self.conv_spatial = DWConv2d(dim, 7, dilation=3)
        self.conv1 = _pw(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class SpatialAttention(nn.Module):
    """``proj_2(LKA(GELU(proj_1(z)))) + z`` (official ``Attention``): the ``"lka"`` mixer.

    Re-parameterisation can give the inner shortcut a per-channel affine (``shortcut_scale``,
    ``shortcut_shift``; ``None`` while it is the identity): absorbing a preceding BN ``a z + b`` folds it into
    ``proj_1`` and the shortcut, and a following layer scale ``s`` scales ``proj_2`` and the shortcut.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = _pw(dim, dim)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LargeKernelAttention(dim)
        self.proj_2 = _pw(dim, dim)
        self.register_parameter("shortcut_scale", None)
        self.register_parameter("shortcut_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        if self.shortcut_scale is None:
            return y + x
        return y + torch.addcmul(self.shortcut_shift.view(1, -1, 1, 1), self.shortcut_scale.view(1, -1, 1, 1), x)

    def _affine_shortcut(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shortcut_scale is None:
            self.shortcut_scale = nn.Parameter(torch.ones_like(self.proj_2.bias))
            self.shortcut_shift = nn.Parameter(torch.zeros_like(self.proj_2.bias))
        return self.shortcut_scale, self.shortcut_shift

    @torch.no_grad()
    def absorb_input_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Compute ``self(scale * x + shift)`` from ``x`` (exact: ``proj_1`` is 1x1, unpadded)."""
        absorb_affine_into_pw_(self.proj_1, scale, shift)
        s, t = self._affine_shortcut()
        t.add_(s * shift)
        s.mul_(scale)

    @torch.no_grad()
    def scale_output_(self, scale: torch.Tensor) -> None:
        """Compute ``scale * self(x)`` per channel."""
        scale_output_(self.proj_2, scale)
        for p in self._affine_shortcut():
            p.mul_(scale)


@register_mixer("lka")
def lka_mixer(dim: int, kernel_size: int) -> SpatialAttention:
    """VAN's spatial mixer; ``kernel_size`` is ignored (LKA's 5x5 + 7x7-dilation-3 decomposition is fixed)."""
    if dim < 1:
        raise ValueError(f"dim of the lka mixer must be positive, got {dim}")
    return SpatialAttention(dim)


class ConvMlp(nn.Module):
    """``fc2(GELU(dwconv3x3(fc1(x))))`` (VAN's MLP: the depthwise 3x3 adds local context)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = _pw(dim, hidden)
        self.dwconv = DWConv2d(hidden, 3)
        self.act = nn.GELU()
        self.fc2 = _pw(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))

    def absorb_input_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Compute ``self(scale * x + shift)`` from ``x`` (exact: ``fc1`` is 1x1, unpadded)."""
        absorb_affine_into_pw_(self.fc1, scale, shift)


@register_block("lka")
class LKABlock(BlockShell):
    """VAN block (MetaFormer layout): ``x + dp(layer_scale_1 * mixer(BN(x)))``, ``x + dp(layer_scale_2 *
    MLP(BN(x)))``; the mixer (attribute ``attn``) is VAN's :class:`SpatialAttention` by default.

    Args:
        dim: channels.
        kernel_size: passed to the mixer (LKA ignores it: its 5x5 + 7x7-dilation-3 decomposition is fixed).
        mlp_ratio: MLP hidden width / dim (VAN: 8, 8, 4, 4 per stage).
        ls_init_value: initial layer scales (1e-2 in VAN).
    """

    own_mixer, mixer_attr = "lka", "attn"

    def __init__(self, dim: int, kernel_size: int | None = None, drop_path: float = 0.0, shared=None,
                 mixer: str | None = None, mixer_kwargs: dict | None = None, mlp_ratio: float = 4.0,
                 ls_init_value: float = 1e-2):
        super().__init__(dim, kernel_size, drop_path)
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio of the LKA block must be positive, got {mlp_ratio}")
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = self._make_mixer(mixer, shared, mixer_kwargs)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = self._layer_scale(ls_init_value)
        self.layer_scale_2 = self._layer_scale(ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._scaled(self.attn(self.norm1(x)), self.layer_scale_1))
        return x + self.drop_path(self._scaled(self.mlp(self.norm2(x)), self.layer_scale_2))

    @torch.no_grad()
    def reparameterize(self):
        """Fold, in eval semantics (idempotent), where the layer after allows it exactly:

        * BN ``norm1`` into the mixer (VAN's attention: into ``attn.proj_1`` and its inner shortcut) and
          ``norm2`` into ``mlp.fc1`` (1x1 convs: exact);
        * ``layer_scale_1`` into the mixer (VAN's: ``attn.proj_2`` and the shortcut), ``layer_scale_2`` into
          ``mlp.fc2``. A mixer that cannot absorb them keeps its BN / layer scale.

        LKA's 5x5 and dilated 7x7 are not merged into one 23x23 kernel: with zero padding between them
        the composition differs near borders, so the merge would not be exact.
        """
        if hasattr(self.attn, "reparameterize"):
            self.attn.reparameterize()
        self._fold_input_norm("norm1", self.attn)
        self._fold_layer_scale("layer_scale_1", self.attn)
        self._fold_input_norm("norm2", self.mlp)
        self._fold_layer_scale("layer_scale_2", self.mlp.fc2)
