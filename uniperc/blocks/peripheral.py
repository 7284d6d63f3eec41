"""PeLK's peripheral convolution and block (Chen et al., "PeLK: Parameter-efficient Large Kernel
ConvNets with Peripheral Convolution", CVPR 2024). No official code exists; this is our reading.

**Sharing grid.** A dense K x K depthwise kernel whose K^2 taps share parameters over a grid that is
fine in the centre and exponentially coarser outward (human peripheral vision). Along one axis, from the
centre tap outward ("half-grid", centre included, (K+1)/2 taps):

* the central region (``central_region`` c, odd: 5 by default, 7 for PeLK-101) is unshared:
  (c+1)/2 blocks of width 1;
* then blocks of width 2, 4, 8, ... -- a block of width w is placed while at least 2w taps remain, so a
  block at least as wide can still follow it;
* the outermost block takes the remaining r taps (w <= r < 4w), so widths never shrink outward
  (a literal "double while it fits" reading would leave finer last blocks at K = 47 and 69).

K = 51, c = 5 gives the half-grid [1, 1, 1, 2, 4, 8, 9] (sum 26 = (51+1)/2), i.e. the axis
[9, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 9]: 13 shared parameters per axis, 13^2 = 169 per channel instead of
51^2 = 2601 (6.5 %). K = 101, c = 7: half-grid [1, 1, 1, 1, 2, 4, 8, 16, 17], 17 per axis. The grid is
separable: tap (i, j) uses parameter (g(i), g(j)). The dense kernel is gathered from the shared parameters
at every forward (autograd scatters gradients back) and run through :func:`uniperc.ops.dwconv2d`.

**Kernel-wise positional embedding** h in R^{C x K x K} (trunc-normal, std 0.02; one per stage, shared by
the stage's peripheral blocks): ``Y(p) = sum_t w(t) * (X(p + t) + h(t))``. Taps that fall on zero padding
carry no feature, so they get no embedding either: the positional term at output p is
``sum over in-image taps t of w(t) h(t)``. Away from the borders it is the per-channel constant
``sum_t w(t) h(t)`` (so there it acts like a bias); near borders it varies with position. We compute it
exactly in O(C (K^2 + HW)) with a 2-D prefix sum of ``w * h`` (:func:`position_term`).

**Reparameterised 5x5** (the paper, following SLaK/RepLKNet): a parallel depthwise 5x5 conv + BN beside
the peripheral conv + BN, both seeing the same embedded window (X + h). It lies inside the unshared centre,
so :meth:`PeripheralConv.reparameterize` folds both BNs and the 5x5 into the shared parameters (plus a
bias): the deploy form is still a peripheral conv, and computes the same function.

**Mixer** (``"peripheral"``, :class:`PartialPeripheralConv`): 3/8 of the channels through the peripheral
conv, the rest passed through unchanged (the paper's partial conv). **Block** (``"peripheral"``): the
ConvNeXt/SLaK block ``x + drop_path(gamma * MLP(LN(mixer(x))))``.
SLaK's dynamic sparsity (40 %) with 1.3x width is a training procedure we do not implement; we keep the
dense model at ConvNeXt's 1x width, whose parameter count equals the paper's non-zero count
(1.3^2 x 0.6 ~= 1.01), see ``uniperc.variants.pelk``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ..ops import DWConv2d, dwconv2d
from ..reparam import fuse_bn, pad_to
from .registry import register_block, register_mixer
from .shell import BlockShell

CONV_FRACTION = (3, 8)  # partial peripheral conv: 3/8 of the channels
DEFAULT_CENTRAL_REGION = 5
DEFAULT_SMALL_KERNEL = 5


def _check_odd(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= {minimum}, got {value!r}")
    return value


def peripheral_half_widths(kernel_size: int, central_region: int = DEFAULT_CENTRAL_REGION) -> list[int]:
    """Sharing-block widths from the centre tap outward (centre included; they sum to (K+1)/2)."""
    _check_odd("kernel_size", kernel_size, 1)
    _check_odd("central_region", central_region, 1)
    if central_region > kernel_size:
        raise ValueError(f"central_region ({central_region}) must not exceed kernel_size ({kernel_size})")
    widths = [1] * ((central_region + 1) // 2)
    remaining = (kernel_size + 1) // 2 - len(widths)
    width = 2
    while remaining >= 2 * width:
        widths.append(width)
        remaining -= width
        width *= 2
    if remaining:
        widths.append(remaining)
    return widths


def peripheral_axis_widths(kernel_size: int, central_region: int = DEFAULT_CENTRAL_REGION) -> list[int]:
    """Block widths along a whole axis (mirror of the half-grid around the shared centre tap)."""
    half = peripheral_half_widths(kernel_size, central_region)
    return half[:0:-1] + half


def peripheral_index(kernel_size: int, central_region: int = DEFAULT_CENTRAL_REGION) -> torch.Tensor:
    """For each of the K taps along an axis, the index of the shared parameter it uses."""
    widths = peripheral_axis_widths(kernel_size, central_region)
    return torch.tensor([cell for cell, width in enumerate(widths) for _ in range(width)])


def position_term(weighted: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``P(p) = sum of weighted[:, a, b] over the taps (a, b) that land inside the H x W image at p``.

    ``weighted`` is ``w * h`` (C x K x K). With S the 2-D prefix sum of ``weighted``, each output needs
    four look-ups (inclusion-exclusion), instead of a K x K conv over a ones mask. Returns 1 x C x H x W.
    """
    k = weighted.shape[-1]
    r = k // 2
    prefix = F.pad(weighted.float().cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # prefix[:, a, b] = sum [:a, :b]
    dev = weighted.device

    def bounds(n: int):  # kernel index range [lo, hi) of the taps inside the image, per output coordinate
        pos = torch.arange(n, device=dev)
        return (r - pos).clamp(min=0), (r + n - pos).clamp(max=k)

    r_lo, r_hi = bounds(height)
    c_lo, c_hi = bounds(width)
    r_lo, r_hi, c_lo, c_hi = r_lo[:, None], r_hi[:, None], c_lo[None, :], c_hi[None, :]
    out = prefix[:, r_hi, c_hi] - prefix[:, r_lo, c_hi] - prefix[:, r_hi, c_lo] + prefix[:, r_lo, c_lo]
    return out.unsqueeze(0)


def _center_crop(kernel: torch.Tensor, size: int) -> torch.Tensor:
    start = (kernel.shape[-1] - size) // 2
    return kernel[..., start:start + size, start:start + size]


class PeripheralPositionEmbedding(nn.Module):
    """The kernel-wise positional embedding h (C x K x K), one per stage."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(channels, kernel_size, kernel_size))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, kernel_size: int) -> torch.Tensor:
        """h for a block of size ``kernel_size`` (central crop when the stage mixes kernel sizes)."""
        if kernel_size > self.pos_embed.shape[-1]:
            raise ValueError(f"kernel_size {kernel_size} exceeds the stage's positional embedding "
                             f"({self.pos_embed.shape[-1]})")
        return _center_crop(self.pos_embed, kernel_size)


class PeripheralConv(nn.Module):
    """Depthwise peripheral conv (+BN) with a parallel 5x5 depthwise conv (+BN), on (X + h).

    Args:
        channels: channels it convolves.
        kernel_size: odd K >= 3.
        central_region: odd size of the unshared centre (default ``min(5, K)``); ValueError if > K.
        small_kernel: parallel small kernel (default ``min(5, central_region)``, none if that equals K;
            0 disables it); must be odd and fit in the central region, so it folds into unshared cells.
    """

    def __init__(self, channels: int, kernel_size: int, central_region: int | None = None,
                 small_kernel: int | None = None):
        super().__init__()
        self.kernel_size = _check_odd("kernel_size", kernel_size, 3)
        if central_region is None:
            central_region = min(DEFAULT_CENTRAL_REGION, kernel_size)
        self.central_region = central_region
        self.register_buffer("index", peripheral_index(kernel_size, central_region), persistent=False)
        n = len(peripheral_axis_widths(kernel_size, central_region))  # shared parameters per axis
        if small_kernel is None:
            small_kernel = min(DEFAULT_SMALL_KERNEL, central_region)
            small_kernel = 0 if small_kernel >= kernel_size else small_kernel
        if small_kernel:
            _check_odd("small_kernel", small_kernel, 1)
            if small_kernel > central_region:
                raise ValueError(f"small_kernel ({small_kernel}) must fit in central_region ({central_region}) "
                                 f"so it folds into unshared kernel cells")
        self.small_kernel = small_kernel
        # shared parameters, fan-in init like a dense depthwise K x K conv
        self.weight = nn.Parameter(torch.empty(channels, n, n).uniform_(-1, 1) / kernel_size)
        self.bn = nn.BatchNorm2d(channels)
        if small_kernel:
            self.small_conv = DWConv2d(channels, small_kernel, bias=False)
            self.small_bn = nn.BatchNorm2d(channels)

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "bn")

    def kernel(self) -> torch.Tensor:
        """The dense C x 1 x K x K kernel gathered from the shared parameters."""
        return self.weight[:, self.index[:, None], self.index[None, :]].unsqueeze(1)

    @staticmethod
    def _embedded_conv(x, kernel, pos_embed, bias=None):
        """``conv(X + h)`` with zero padding where h only joins in-image taps."""
        out = dwconv2d(x, kernel, bias)
        return out + position_term(kernel[:, 0] * pos_embed, x.shape[-2], x.shape[-1]).to(out.dtype)

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel()
        if self.deployed:
            return self._embedded_conv(x, kernel, pos_embed, self.bias)
        out = self.bn(self._embedded_conv(x, kernel, pos_embed))
        if self.small_kernel:
            small = self.small_conv.weight
            embedded = self.small_conv(x) + position_term(
                small[:, 0] * _center_crop(pos_embed, self.small_kernel), x.shape[-2], x.shape[-1])
            out = out + self.small_bn(embedded)
        return out

    @torch.no_grad()
    def reparameterize(self):
        """Fold the BNs and the small kernel into the shared parameters plus a bias (idempotent)."""
        if self.deployed:
            return
        weight, bias = fuse_bn(self.weight, None, self.bn)
        if self.small_kernel:
            small, small_bias = fuse_bn(self.small_conv.weight, None, self.small_bn)
            weight = weight + pad_to(small[:, 0], weight.shape[-1])  # the small kernel sits in unshared cells
            bias = bias + small_bias
            del self.small_conv, self.small_bn
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        del self.bn


@register_mixer("peripheral")
class PartialPeripheralConv(PeripheralConv):
    """PeLK's spatial mixer: 3/8 of the channels through a :class:`PeripheralConv` on (X + h), the rest passed
    through unchanged (the paper's partial conv).

    ``shared`` is the stage's :class:`PeripheralPositionEmbedding` (built by :meth:`make_stage_shared`);
    without one, the mixer owns its own embedding (``own_pos_embed``).
    """

    def __init__(self, dim: int, kernel_size: int, shared=None, central_region: int | None = None,
                 small_kernel: int | None = None):
        if dim % CONV_FRACTION[1]:
            raise ValueError(f"dim of the peripheral mixer must be divisible by {CONV_FRACTION[1]} "
                             f"({CONV_FRACTION[0]}/{CONV_FRACTION[1]} of the channels are convolved), got {dim}")
        conv_channels = dim * CONV_FRACTION[0] // CONV_FRACTION[1]
        super().__init__(conv_channels, kernel_size, central_region, small_kernel)
        self.conv_channels = conv_channels
        if shared is None:
            shared = self.make_stage_shared(dim, kernel_size)
            self.own_pos_embed = shared
        # a plain list, so a stage-shared embedding is saved once (under the stage), not in every block
        self._pos_embed = [shared]

    @staticmethod
    def make_stage_shared(dim: int, kernel_size: int) -> PeripheralPositionEmbedding:
        """The stage's positional embedding over the convolved 3/8 of ``dim`` channels."""
        _check_odd("kernel_size", kernel_size, 3)
        return PeripheralPositionEmbedding(dim * CONV_FRACTION[0] // CONV_FRACTION[1], kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_part, identity_part = x.split([self.conv_channels, x.shape[1] - self.conv_channels], dim=1)
        mixed = super().forward(conv_part, self._pos_embed[0](self.kernel_size))
        return torch.cat([mixed, identity_part], dim=1)


@register_block("peripheral")
class PeripheralBlock(BlockShell):
    """ConvNeXt block (PeLK's shell): ``x + drop_path(gamma * MLP(LN(mixer(x))))``; the MLP is 4x with GELU.

    The mixer (attribute ``conv``) is :class:`PartialPeripheralConv` by default. No spatial operation
    outside the mixer, which is why the mixer benchmark uses this shell.
    """

    own_mixer, mixer_attr = "peripheral", "conv"

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, shared=None, mixer: str | None = None,
                 mixer_kwargs: dict | None = None, mlp_ratio: float = 4.0, ls_init_value: float | None = 1e-6):
        super().__init__(dim, kernel_size, drop_path)
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.conv = self._make_mixer(mixer, shared, mixer_kwargs)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.gamma = self._layer_scale(ls_init_value)

    @property
    def _pos_embed(self) -> list:
        """The positional embedding the peripheral mixer reads (the stage's, or its own)."""
        return self.conv._pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv(x).permute(0, 2, 3, 1)))
        return x + self.drop_path(self._scaled(y, self.gamma, channels_last=True).permute(0, 3, 1, 2))

    @torch.no_grad()
    def reparameterize(self):
        """Fold the mixer (the peripheral conv folds its BNs and small kernel) and the layer scale into
        ``mlp.fc2``."""
        if hasattr(self.conv, "reparameterize"):
            self.conv.reparameterize()
        self._fold_layer_scale("gamma", self.mlp.fc2)
