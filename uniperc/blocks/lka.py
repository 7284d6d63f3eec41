"""VAN's Large Kernel Attention and block (Guo et al., "Visual Attention Network", 2022).

LKA decomposes a 21 x 21 depthwise conv into a 5 x 5 depthwise conv (local), a 7 x 7 depthwise conv at
dilation 3 (long range, 19 x 19 span; 5 + 19 - 1 = 23 >= 21) and a 1 x 1 conv (channels), and uses the
result as an attention map: ``LKA(u) = u * conv1x1(dw7x7_d3(dw5x5(u)))``.

Block (official layout): ``x + dp(ls1 * Attn(BN(x)))``, ``x + dp(ls2 * MLP(BN(x)))`` with
``Attn(z) = proj_2(LKA(GELU(proj_1(z)))) + z`` and ``MLP = fc2(GELU(dw3x3(fc1(z))))``; layer scales start
at 1e-2. Sub-module names follow the official code (``attn.proj_1``, ``attn.spatial_gating_unit.conv0``,
...) except ``mlp.dwconv``, which the official code nests one level deeper (``mlp.dwconv.dwconv``).

The kernel sizes are fixed by the design, so the block accepts and ignores the backbone's ``kernel_size``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..ops import DWConv2d
from ..reparam import fuse_bn, scale_output_
from .registry import register_block


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
    """``proj_2(LKA(GELU(proj_1(z)))) + z``."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = _pw(dim, dim)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LargeKernelAttention(dim)
        self.proj_2 = _pw(dim, dim)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + x


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


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``scale * x + shift`` per channel."""
    scale, shift = fuse_bn(torch.ones_like(bn.running_mean).view(-1, 1), None, bn)
    return scale.view(-1), shift


@torch.no_grad()
def _fold_affine_into_pw(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor):
    """Make ``conv(x)`` compute ``conv(scale * x + shift)`` (1x1 conv, no padding: exact)."""
    w = conv.weight[:, :, 0, 0]
    conv.bias.add_(w @ shift)
    conv.weight.mul_(scale.view(1, -1, 1, 1))


@register_block("lka")
class LKABlock(nn.Module):
    """VAN block: BN -> spatial attention (LKA) and BN -> conv MLP, each with layer scale and drop path.

    Args:
        dim: channels.
        kernel_size: ignored (LKA's 5x5 + 7x7-dilation-3 decomposition of 21x21 is fixed).
        mlp_ratio: MLP hidden width / dim (VAN: 8, 8, 4, 4 per stage).
        ls_init_value: initial layer scales (1e-2 in VAN).
    """

    def __init__(self, dim: int, kernel_size: int | None = None, drop_path: float = 0.0, shared=None,
                 mlp_ratio: float = 4.0, ls_init_value: float = 1e-2):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim of the LKA block must be positive, got {dim}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio of the LKA block must be positive, got {mlp_ratio}")
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(ls_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(ls_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "norm1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:  # inference form (no drop path), see reparameterize()
            x = torch.addcmul(self.skip_shift.view(1, -1, 1, 1), self.skip_scale.view(1, -1, 1, 1), x) \
                + self.attn.branch(x)
            return x + self.mlp(x)
        x = x + self.drop_path(self.layer_scale_1.view(1, -1, 1, 1) * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2.view(1, -1, 1, 1) * self.mlp(self.norm2(x)))

    @torch.no_grad()
    def reparameterize(self):
        """Fold, in eval semantics (idempotent):

        * BN ``norm1`` (``a x + b``) into ``attn.proj_1``; ``norm2`` into ``mlp.fc1`` (1x1 convs: exact);
        * ``layer_scale_1`` into ``attn.proj_2`` and ``layer_scale_2`` into ``mlp.fc2``;
        * the attention's inner shortcut ``ls1 (a x + b)`` into the block's skip:
          ``x + ls1 (a x + b) = (1 + ls1 a) x + ls1 b`` (``skip_scale``, ``skip_shift``).

        LKA's 5x5 and dilated 7x7 are not merged into one 23x23 kernel: with zero padding between them
        the composition differs near borders, so the merge would not be exact.
        """
        if self.deployed:
            return
        ls1, ls2 = self.layer_scale_1.detach(), self.layer_scale_2.detach()
        scale1, shift1 = _bn_affine(self.norm1)
        scale2, shift2 = _bn_affine(self.norm2)
        _fold_affine_into_pw(self.attn.proj_1, scale1, shift1)
        scale_output_(self.attn.proj_2, ls1)
        _fold_affine_into_pw(self.mlp.fc1, scale2, shift2)
        scale_output_(self.mlp.fc2, ls2)
        self.skip_scale = nn.Parameter(1 + ls1 * scale1)
        self.skip_shift = nn.Parameter(ls1 * shift1)
        del self.norm1, self.norm2, self.layer_scale_1, self.layer_scale_2
