"""DCNv3 (InternImage's deformable convolution v3) in plain PyTorch, in UniConvNet's form.

Why written here: the official operator is a CUDA extension that has to be compiled against the
local torch/CUDA, and its PyTorch fallback (``dcnv3_core_pytorch`` in InternImage's
``ops_dcnv3/functions/dcnv3_func.py``) is marked "for debug and test only". This module is a
single ``torch.nn.functional.grid_sample`` call, so it runs on any device, autograd and
``torch.compile`` see through it, and ``gradcheck`` passes in float64.

Sampling convention (identical to InternImage's reference and CUDA kernels): for output pixel
``(i, j)`` the centre in input pixel coordinates is ``(j*stride - pad + dilation*(k-1)//2,
i*stride - pad + dilation*(k-1)//2)`` as ``(x, y)``; tap ``p`` of group ``g`` samples, bilinearly,
with zeros outside the image, at::

    centre + offset_scale * (tap_p + offset[..., g, p, :])
    tap_p = (dilation*kx - dilation*(k-1)//2,  dilation*ky - dilation*(k-1)//2)   # (x, y)
    p     = kx * k + ky                                                          # x-major!

so taps are enumerated **column-major** (x outer, y inner; InternImage builds them with
``meshgrid(x, y, indexing="ij")``), offsets are ``(x, y)`` pairs, and ``offset_scale`` scales the
fixed tap grid as well as the learned offsets. InternImage zero-pads the input and samples it with
``align_corners=False``; sampling the unpadded input at the shifted coordinates with
``padding_mode="zeros"`` is the same function (bilinear interpolation of a zero-extended image),
without materialising the padded copy.

Channels are grouped contiguously: group ``g`` owns channels ``g*C/G .. (g+1)*C/G - 1`` and shares
one set of ``k*k`` offsets and mask values. The core has **no kernel weights**: the mask value is
the per-tap weight. Hence, with zero offsets and a mask that is the same ``m[g, p]`` at every
pixel, the core equals a depthwise ``k x k`` conv (``groups=C``) whose weight for every channel of
group ``g`` is ``w[c, 0, ky, kx] = m[g, kx*k + ky]`` (note the transpose from the x-major tap
order), with the same stride, padding and dilation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def _tap_grid(kernel_size: int, dilation: int, dtype, device) -> torch.Tensor:
    """``(k*k, 2)`` tap displacements ``(x, y)`` in pixels, x-major as in InternImage."""
    half = dilation * (kernel_size - 1) // 2
    steps = torch.arange(kernel_size, dtype=dtype, device=device) * dilation - half
    tx, ty = torch.meshgrid(steps, steps, indexing="ij")  # first index is x: x-major enumeration
    return torch.stack((tx, ty), dim=-1).reshape(-1, 2)


def dcnv3_core(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *, kernel_size: int = 3,
               stride: int = 1, pad: int = 1, dilation: int = 1, group: int = 1,
               offset_scale: float = 1.0) -> torch.Tensor:
    """Group-wise deformable ``k x k`` sampling, weighted by ``mask`` and summed over taps.

    Shapes are channels-last, as in InternImage: ``x`` is ``(N, H, W, C)``, ``offset`` is
    ``(N, Ho, Wo, group*k*k*2)`` laid out ``(group, tap, xy)``, ``mask`` is ``(N, Ho, Wo, group*k*k)``
    laid out ``(group, tap)``; ``Ho = (H + 2*pad - dilation*(k-1) - 1) // stride + 1`` (same for W).
    Returns ``(N, Ho, Wo, C)``. The mask is used as given (UniConvNet applies no softmax).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {tuple(x.shape)}")
    n, h, w, c = x.shape
    if group < 1 or c % group:
        raise ValueError(f"group={group} must be a positive divisor of the channel count {c}")
    if kernel_size < 1 or stride < 1 or dilation < 1 or pad < 0:
        raise ValueError(f"kernel_size, stride, dilation must be >= 1 and pad >= 0, got "
                         f"kernel_size={kernel_size}, stride={stride}, dilation={dilation}, pad={pad}")
    taps = kernel_size * kernel_size
    h_out = (h + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel_size={kernel_size}, "
                         f"dilation={dilation}, pad={pad}")
    if tuple(offset.shape) != (n, h_out, w_out, group * taps * 2):
        raise ValueError(f"offset must have shape {(n, h_out, w_out, group * taps * 2)}, "
                         f"got {tuple(offset.shape)}")
    if tuple(mask.shape) != (n, h_out, w_out, group * taps):
        raise ValueError(f"mask must have shape {(n, h_out, w_out, group * taps)}, got {tuple(mask.shape)}")

    # Sampling positions in input pixel coordinates: (N, Ho, Wo, G, P, 2) as (x, y).
    first = dilation * (kernel_size - 1) // 2 - pad
    ys = torch.arange(h_out, dtype=x.dtype, device=x.device) * stride + first
    xs = torch.arange(w_out, dtype=x.dtype, device=x.device) * stride + first
    centre = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (Ho, Wo, 2) as (x, y)
    tap = _tap_grid(kernel_size, dilation, x.dtype, x.device)  # (P, 2)
    offset = rearrange(offset, "n h w (g p xy) -> n h w g p xy", g=group, p=taps, xy=2)
    pos = centre[:, :, None, None, :] + offset_scale * (tap + offset)

    # Pixel -> grid_sample's [-1, 1] coordinates for align_corners=False: u = (2p + 1) / size - 1.
    # (Python scalars: no host-to-device copy per call)
    grid = torch.stack(((2 * pos[..., 0] + 1) / w - 1, (2 * pos[..., 1] + 1) / h - 1), dim=-1)
    grid = rearrange(grid, "n h w g p xy -> (n g) (h w) p xy")
    feats = rearrange(x, "n h w (g c) -> (n g) c h w", g=group)
    sampled = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, C/G, Ho*Wo, P); weight every tap by its mask value and sum the taps.
    weights = rearrange(mask, "n h w (g p) -> (n g) 1 (h w) p", g=group, p=taps)
    out = (sampled * weights).sum(-1)
    return rearrange(out, "(n g) c (h w) -> n h w (g c)", n=n, g=group, h=h_out)


class DCNv3(nn.Module):
    """UniConvNet's DCNv3 layer, channels-last ``(N, H, W, C)`` in and out, 'same' size, stride 1.

    ``input_proj`` (Linear) gives the features to sample; a plain depthwise ``dw_kernel_size`` conv
    on the *input* (no norm, no activation -- the official UniConvNet checkpoints hold only
    ``dw_conv.0.{weight,bias}``) feeds the ``offset`` (``2*group*k*k``) and ``mask`` (``group*k*k``)
    Linears; the mask is used raw (no softmax, unlike InternImage); ``output_proj`` mixes groups.
    State-dict keys match the official ones except ``dw_conv.0.*`` -> ``dw_conv.*``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, group: int = 4,
                 offset_scale: float = 1.0, dw_kernel_size: int | None = None):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if group < 1 or channels % group:
            raise ValueError(f"group={group} must be a positive divisor of channels={channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        if dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
            raise ValueError(f"dw_kernel_size must be a positive odd integer, got {dw_kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.group = group
        self.offset_scale = offset_scale
        taps = kernel_size * kernel_size
        self.dw_conv = nn.Conv2d(channels, channels, dw_kernel_size, padding=dw_kernel_size // 2,
                                 groups=channels)
        self.offset = nn.Linear(channels, group * taps * 2)
        self.mask = nn.Linear(channels, group * taps)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self):
        """InternImage's DCNv3 init: zero offset and mask predictors (every tap starts at its grid
        position with weight 0), Xavier projections. ``dw_conv`` keeps its container's init (the
        official UniConvNet runs this after its trunc-normal(0.02) init of every conv/linear)."""
        for lin in (self.offset, self.mask):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"expected (N, H, W, {self.channels}) channels-last input, got {tuple(x.shape)}")
        cond = self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = dcnv3_core(self.input_proj(x), self.offset(cond), self.mask(cond),
                       kernel_size=self.kernel_size, stride=1,
                       pad=self.dilation * (self.kernel_size - 1) // 2, dilation=self.dilation,
                       group=self.group, offset_scale=self.offset_scale)
        return self.output_proj(y)
