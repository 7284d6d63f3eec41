"""UniConvNet's Receptive Field Aggregator (the ``"rfa"`` mixer) and UniConvBlock (the ``"rfa"`` block)
(Wang & Xi, ICCV 2025).

The RFA (official class ``ConvMod``) widens the effective receptive field with three stacked layers of
*medium* depthwise kernels (7, 9, 11) instead of one huge kernel, so the ERF stays close to a Gaussian.
Its channels are split into four quarters ``x0..x3``; layer ``l`` works on ``l/4`` of the channels and
hands a growing tensor to the next layer:

* layer 1 (C/4, DW7):  ``a = DW7(GELU(PW(x0)))``, ``mul = PW(a * PW(x0))``,
  ``h = DW3(PW(x1)) + a``;  ``cat(h, mul)`` -> C/2
* layer 2 (C/2, DW9):  after an LN, the same "amplifier" ``a`` / "discriminator" ``mul`` pair, and
  ``h = DW3(PW(x2)) + PW(a)`` (a C/2 -> C/4 projection);  ``cat`` -> 3C/4
* layer 3 (3C/4, DW11): likewise with ``x3``;  ``cat`` -> C

Attribute names (``a1``, ``v1``, ``v11``, ``v12``, ``conv3_1``, ``norm2``, ``proj2``, ...) are the
official ones, so official checkpoints map key for key (see ``uniperc.variants.uniconvnet``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, Mlp

from ..ops import DCNv3, DWConv2d
from ..reparam import scale_output_
from .registry import register_block, register_mixer
from .shell import BlockShell


def _pw(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1)


def _dw3(ch: int) -> nn.Conv2d:
    return DWConv2d(ch, 3)


def _amplifier(ch: int, kernel_size: int) -> nn.Sequential:
    """``DWk(GELU(PW(x)))``; indices 0 and 2 hold the weights, as in the official ``a1/a2/a3``."""
    return nn.Sequential(_pw(ch, ch), nn.GELU(), DWConv2d(ch, kernel_size))


class ReceptiveFieldAggregator(nn.Module):
    """Three-layer RFA on ``B x dim x H x W`` (pre-normed by ``norm1``), output of the same shape."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 4:
            raise ValueError(f"dim of the RFA must be a positive multiple of 4 (it splits channels into "
                             f"4 chunks), got {dim}")
        q = dim // 4
        self.dim = dim
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        # layer 1: C/4 channels, 7x7
        self.a1 = _amplifier(q, 7)
        self.v1, self.v11, self.v12 = _pw(q, q), _pw(q, q), _pw(q, q)
        self.conv3_1 = _dw3(q)
        # layer 2: C/2 channels, 9x9
        self.norm2 = LayerNorm2d(2 * q, eps=1e-6)
        self.a2 = _amplifier(2 * q, 9)
        self.v2, self.v21 = _pw(2 * q, 2 * q), _pw(2 * q, 2 * q)
        self.v22 = _pw(q, q)
        self.proj2 = _pw(2 * q, q)
        self.conv3_2 = _dw3(q)
        # layer 3: 3C/4 channels, 11x11
        self.norm3 = LayerNorm2d(3 * q, eps=1e-6)
        self.a3 = _amplifier(3 * q, 11)
        self.v3, self.v31 = _pw(3 * q, 3 * q), _pw(3 * q, 3 * q)
        self.v32 = _pw(q, q)
        self.proj3 = _pw(3 * q, q)
        self.conv3_3 = _dw3(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1, x2, x3 = torch.split(self.norm1(x), self.dim // 4, dim=1)

        a = self.a1(x0)
        mul = self.v11(a * self.v1(x0))
        y = torch.cat((self.conv3_1(self.v12(x1)) + a, mul), dim=1)

        y = self.norm2(y)
        a = self.a2(y)
        mul = self.v21(a * self.v2(y))
        y = torch.cat((self.conv3_2(self.v22(x2)) + self.proj2(a), mul), dim=1)

        y = self.norm3(y)
        a = self.a3(y)
        mul = self.v31(a * self.v3(y))
        return torch.cat((self.conv3_3(self.v32(x3)) + self.proj3(a), mul), dim=1)

    @torch.no_grad()
    def scale_output_(self, scale: torch.Tensor):
        """Multiply the output channels by ``scale`` by rescaling the last layer's weights (exact):
        the first C/4 outputs are ``conv3_3(.) + proj3(.)``, the rest ``v31(.)``."""
        q = self.dim // 4
        for conv, s in ((self.conv3_3, scale[:q]), (self.proj3, scale[:q]), (self.v31, scale[q:])):
            scale_output_(conv, s)


@register_mixer("rfa")
def rfa_mixer(dim: int, kernel_size: int) -> ReceptiveFieldAggregator:
    """UniConvNet's spatial mixer; ``kernel_size`` is ignored (the RFA's kernels are fixed at 7/9/11)."""
    return ReceptiveFieldAggregator(dim)


@register_block("rfa")
class UniConvBlock(BlockShell):
    """UniConvNet block: ``x += dp(layer_scale * mixer(x))``; then channels-last
    ``x += dp(gamma1 * DCNv3(LN(x)))`` and ``x += dp(gamma2 * MLP(LN(x)))``.

    The mixer (attribute ``attn``) is the RFA by default, which normalises its own input (``attn.norm1``),
    so the shell puts no norm before it; another mixer gets ``x`` as it is. ``kernel_size`` goes to the
    mixer (the RFA ignores it; the DCN's is 3). ``dcn_group_channels`` is the channel count per DCNv3 group
    (official: 8 for UniConvNet-A..P2, i.e. ``group = dim // 8``; 16 for N0..XL).
    ``layer_scale_init_value`` defaults to 1e-6: the official ``Block`` default is 1e-5 but the
    official ``UniConvNet`` model always passes its own default 1e-6, which is what was trained.
    Initialisation: the official model gives every conv/linear trunc-normal(0.02) weights and zero
    biases (``UniPercNet`` does the same for all blocks), then re-runs DCNv3's own reset (zero
    offset/mask, Xavier projections) -- see ``uniperc.variants.uniconvnet``.
    """

    own_mixer, mixer_attr = "rfa", "attn"

    def __init__(self, dim: int, kernel_size: int | None = None, drop_path: float = 0.0, shared=None,
                 mixer: str | None = None, mixer_kwargs: dict | None = None, mlp_ratio: float = 4.0,
                 dcn_group_channels: int = 8, layer_scale_init_value: float = 1e-6, drop: float = 0.0):
        super().__init__(dim, kernel_size, drop_path)
        if not isinstance(dcn_group_channels, int) or dcn_group_channels < 1 or dim % dcn_group_channels:
            raise ValueError(f"dcn_group_channels={dcn_group_channels!r} must be a positive divisor of "
                             f"dim={dim} (DCNv3 group = dim // dcn_group_channels)")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.attn = self._make_mixer(mixer, shared, mixer_kwargs)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.dcn = DCNv3(dim, kernel_size=3, group=dim // dcn_group_channels, offset_scale=1.0)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.layer_scale = self._layer_scale(layer_scale_init_value)
        self.gamma1 = self._layer_scale(layer_scale_init_value)
        self.gamma2 = self._layer_scale(layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.drop_path(self._scaled(self.attn(x), self.layer_scale))).permute(0, 2, 3, 1)
        x = x + self.drop_path(self._scaled(self.dcn(self.norm1(x)), self.gamma1, channels_last=True))
        x = x + self.drop_path(self._scaled(self.mlp(self.norm2(x)), self.gamma2, channels_last=True))
        return x.permute(0, 3, 1, 2)

    @torch.no_grad()
    def reparameterize(self):
        """Fold the three layer scales into the linear maps that precede them (exact, also in
        training since DropPath scales whole samples): ``layer_scale`` into the mixer when it can scale its
        output (the RFA: its last layer ``conv3_3``, ``proj3``, ``v31``; otherwise it stays), ``gamma1`` into
        ``dcn.output_proj``, ``gamma2`` into ``mlp.fc2``; each removes one elementwise pass over the feature
        map. The LayerNorm affines are left alone: ``layer_norm`` applies them in the same kernel, so
        folding them (exact where only 1x1 convs / linears follow; not for ``norm1``, which also feeds the
        zero-padded ``dcn.dw_conv``) would save nothing. Idempotent."""
        self._fold_layer_scale("layer_scale", self.attn)
        self._fold_layer_scale("gamma1", self.dcn.output_proj)
        self._fold_layer_scale("gamma2", self.mlp.fc2)
