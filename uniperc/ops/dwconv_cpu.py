"""CPU implementation of ``uniperc::dwconv2d`` and ``uniperc::dwconv2d_weight_grad``.

PyTorch's own CPU depthwise kernels are exact but pick the wrong algorithm for large kernels: the
NCHW forward is 20-45x slower than channels_last at K >= 15, and the weight gradient (a reduction of
``x * dy`` over batch and pixels for each of the K*K taps) is 25-70x slower than the forward. Each
function below picks, from the kernel size and dilation alone, the exact algorithm that was fastest
in single-threaded measurements (``python -m uniperc.bench dwconv_cpu``; table in docs/dwconv.md):

* forward and input gradient (a forward with the flipped kernel): aten in channels_last for K >= 15,
  dilation >= 3 and K >= 7 at dilation 2, in NCHW for 11 <= K <= 13 at dilation 1, else in the input's
  layout (:func:`forward_layout`); K = 1 elementwise (a per-channel scale); 7 <= K < 15 at dilation >= 3
  undilated on the plane's d*d phases (:func:`by_phases`);
* weight gradient (:func:`weight_grad_path`): ``"fft"`` (correlation in the frequency domain, summed
  over the batch there) for K >= 15 or padding >= 12 at dilation 2, ``"aten"`` (aten's kernel, in the forward's layout)
  for K = 3 and 5 at dilation >= 3, ``"phases"`` (the undilated gradient of the phases) for 7 <= K < 15 at
  dilation >= 3, ``"scale"`` (a per-channel sum) for K = 1, ``"batch"``
  (batch-as-channels: one depthwise conv of x with dy as the kernel) otherwise.

bf16 / fp16 are computed in fp32 and rounded once at the end (the FFT never runs in low precision);
fp64 stays fp64. All paths agree with ``F.conv2d`` and its autograd to ~1e-6 relative in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

#: Forward / input grad in NCHW for this range of K at dilation 1 (see :func:`forward_layout`).
FWD_NCHW_K = range(11, 14)
#: Weight gradient by FFT from this K on, or from this padding d*(K//2) on at dilation 2.
WGRAD_FFT_MIN_K = 15
WGRAD_FFT_MIN_PAD = 12
#: Weight-gradient algorithms for any K and dilation; :func:`weight_grad_path` also picks "scale" (K = 1) and
#: "phases" (:func:`by_phases`).
WGRAD_PATHS = ("aten", "batch", "fft")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def reach(k: int, dilation: int, height: int, width: int) -> int:
    """Size of the centre of a K x K kernel that can touch an ``height x width`` plane. A tap at offset
    ``dilation * i`` with ``|dilation * i|`` beyond the plane's larger side - 1 only ever meets the 'same'
    padding's zeros, so dropping it leaves the forward, the input gradient and the weight gradient exactly as
    they were, and the work falls with the square of the kernel. The last stages of a large-kernel net on small
    inputs are such planes: UniRepLKNet-A on 32 px images ends at 1 x 1 with K = 7, where the batch-as-channels
    weight gradient took 102 ms and the 1 x 1 one takes 0.3 (64 x 256 channels x batch)."""
    return 2 * min(k // 2, (max(height, width) - 1) // dilation) + 1


def centre(weight: Tensor, k: int) -> Tensor:
    """The centre ``k x k`` taps of a ``(C, 1, K, K)`` kernel (a view)."""
    q = (weight.shape[-1] - k) // 2
    return weight[..., q:q + k, q:q + k] if q else weight


def by_phases(k: int, dilation: int) -> bool:
    """Whether a dilated kernel runs as an undilated one on the ``d * d`` phases of the plane
    (:func:`to_phases`): for 7 <= K < 15 at dilation >= 3, where aten's dilated kernels are slow in every
    layout (K=7 d=3 on 8x80x28x28, fwd+bwd: 32 ms NCHW, 11.6 channels_last, 7.3-8.7 by phases). Smaller
    kernels lose by the copies (K=3 d=4: 4.2 vs 1.7 ms); larger ones take the FFT."""
    return dilation >= 3 and 7 <= k < WGRAD_FFT_MIN_K


def to_phases(x: Tensor, dilation: int) -> Tensor:
    """``(B, C, H, W) -> (B*d*d, C, ceil(H/d), ceil(W/d))``: each phase ``x[..., i::d, j::d]`` as its own
    sample. A conv with dilation d only ever combines pixels of one phase, and on its phase it is the same
    kernel undilated; the zeros that pad H, W to multiples of d stand where the 'same' padding's zeros would."""
    h, w = x.shape[-2:]
    return rearrange(F.pad(x, (0, -w % dilation, 0, -h % dilation)), "b c (h i) (w j) -> (b i j) c h w",
                     i=dilation, j=dilation)


def from_phases(y: Tensor, dilation: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`to_phases`, cropped to ``height x width``."""
    return rearrange(y, "(b i j) c h w -> b c (h i) (w j)", i=dilation, j=dilation)[..., :height, :width]


def layout(x: Tensor) -> torch.memory_format:
    """channels_last when the channels of ``x`` are its unit-stride dim, NCHW otherwise."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def forward_layout(k: int, dilation: int, given: torch.memory_format, width: Optional[int] = None) -> torch.memory_format:
    """Layout aten's depthwise kernels (forward, and its weight gradient where :func:`weight_grad_path` keeps
    it) run fastest in, for an input in layout ``given``. The NCHW kernel falls to a slow path at K >= 15
    (20-45x slower: K=51 on 8x64x56x51, 4074 vs 89 ms) and at dilation >= 3, or 2 with K >= 7 (K=13 d=2:
    128 vs 67 ms; K=7 d=3 on 8x80x28x28: 7.9 vs 3.3 ms forward, 15.8 vs 3.8 weight gradient; K=3 d=3 on
    8x40x56x56: 5.5 vs 2.7 weight gradient), and whatever K when the padding is wider than the plane
    (``dilation * (k // 2) > width``: UniRepLKNet-A's stage 4 at 128 px, 4x320x4x4 with K=13, 4.0 vs 0.11 ms).
    NCHW is the faster one for 11 <= K <= 13 at dilation 1 (2-6x). Elsewhere both are fast and a conversion
    costs more than it saves (K = 3 on 8x40x56x56 from NCHW: 10-23 ms fwd+bwd with the copies, 7-10 without),
    so the input's own layout is kept."""
    if k >= 15 or dilation >= 3 or (dilation == 2 and k >= 7) or (width is not None and dilation * (k // 2) > width):
        return torch.channels_last
    return torch.contiguous_format if dilation == 1 and k in FWD_NCHW_K else given


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """``conv(x, weight) + bias`` ('same' padding), in the accumulation dtype, in any layout. K = 1 (also
    what a large kernel reduces to on a 1 x 1 plane, see :func:`reach`) is a per-channel scale, computed
    elementwise in x's layout: aten runs it as one slow conv per channel, 5-30x slower (8x80x28x28: 0.38 vs
    0.04 ms NCHW, 1.4 vs 0.05 channels_last)."""
    k, acc = weight.shape[-1], _acc(x.dtype)
    if by_phases(k, dilation):
        return from_phases(forward(to_phases(x, dilation), weight, bias, 1), dilation, *x.shape[-2:])
    if k == 1:
        y = x.to(acc) * weight.to(acc).view(1, -1, 1, 1)
        return y if bias is None else y + bias.to(acc).view(1, -1, 1, 1)
    xc = x.to(acc).contiguous(memory_format=forward_layout(k, dilation, layout(x), width=x.shape[-1]))
    return F.conv2d(xc, weight.to(acc), None if bias is None else bias.to(acc),
                    padding=dilation * (k // 2), dilation=dilation, groups=x.shape[1])


def weight_grad_path(k: int, dilation: int) -> str:
    """Fastest exact weight-gradient algorithm (measured on 8x80x28x28 unless said otherwise):

    * ``"fft"`` for K >= 15, and for a padding d*(K//2) >= 12 at dilation 2: the reduction costs
      O(K^2) per pixel directly but O(log HW) in the frequency domain (K=25 on 32x80x32x32: 280 ms vs
      2287 batch-as-channels and 4389 aten; K=13 d=2: 19 vs 25 aten, 124 batch);
    * ``"phases"`` where :func:`by_phases`: the undilated weight gradient of the phases, summed over them
      with the batch (K=7 d=3: the batch-as-channels path on 9x as many 10x10 planes);
    * ``"scale"`` for K = 1: ``sum(x * dy)`` per channel (8x80x28x28: 0.07 ms vs 0.45 aten NCHW, 1.4 channels_last);
    * ``"aten"`` (in :func:`forward_layout`'s layout) for K = 3, and K = 5 at dilation >= 3: its kernel is
      fast there (K=3: 0.8 ms vs 2.0 batch on 8x40x56x56, channels_last);
    * ``"batch"`` otherwise: aten's weight gradient is 5-20x slower than its forward, whereas a
      forward-style depthwise conv of x with dy as the kernel does the same reduction (K=13 on
      32x80x32x32: 83 vs 550 ms aten channels_last, 370 FFT).
    """
    if k == 1:
        return "scale"
    if by_phases(k, dilation):
        return "phases"
    if k >= WGRAD_FFT_MIN_K:
        return "fft"
    if k == 3 or dilation >= 3:
        return "aten"
    return "fft" if dilation * (k // 2) >= WGRAD_FFT_MIN_PAD else "batch"


def aten_throughout(k: int, dilation: int, given: torch.memory_format) -> bool:
    """Whether the forward, the input gradient and the weight gradient all run aten's own kernel in the input's
    layout ``given``, so that plain ``F.conv2d`` autograd computes exactly what the op would: K = 3 at dilation 1.
    (K = 3 and 5 at dilation >= 3 also keep aten's kernels, but the op's input gradient, a forward with the
    flipped kernel, beats aten's backward there: K=3 d=4 on 8x80x28x28, 1.6 vs 2.2 ms.)"""
    return k == 3 and dilation == 1 and weight_grad_path(k, dilation) == "aten" \
        and forward_layout(k, dilation, given) == given


def weight_grad(grad_out: Tensor, x: Tensor, k: int, dilation: int) -> Tensor:
    """``w[c, 0, i, j] = sum_{b,y,x} x_pad[b, c, y + i*d, x + j*d] * dy[b, c, y, x]`` as a
    ``(C, 1, K, K)`` tensor in the accumulation dtype (fp32, fp64 for fp64)."""
    acc, path = _acc(x.dtype), weight_grad_path(k, dilation)
    if path == "aten":
        fmt = forward_layout(k, dilation, layout(x), width=x.shape[-1])
        grad_out, x = grad_out.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
    return _WGRAD[path](grad_out.to(acc), x.to(acc), k, dilation).contiguous()


def aten_weight_grad(dy: Tensor, x: Tensor, k: int, d: int) -> Tensor:
    """aten's own depthwise weight gradient, in x's layout (``dy`` comes in the same one), on any device."""
    c = x.shape[1]
    # aten's conv backward only reads the weight's shape when just the weight gradient is asked for
    _, gw, _ = torch.ops.aten.convolution_backward(
        dy, x, x.new_empty(c, 1, k, k), None, [1, 1], [d * (k // 2)] * 2, [d, d], False, [0, 0], c,
        [False, True, False])
    return gw


def _wgrad_batch(dy: Tensor, x: Tensor, k: int, d: int) -> Tensor:
    """Batch-as-channels: x as ONE image of B*C channels (channels_last), dy as its (B*C, 1, H, W)
    depthwise kernel. With padding p = d*(K//2) and stride d the conv's output (i, j) is
    ``sum_{y,x} x_pad[y + i*d, x + j*d] * dy[y, x]`` for i, j < K: the per-sample weight gradient,
    summed over the batch afterwards.

    A side of the plane no longer than the padding (only on non-square planes, after :func:`reach`) is first
    grown with zeros to padding + 1, in x and dy alike: aten's depthwise kernel takes a slow path when the
    padding reaches the kernel's (dy's) size (UniRepLKNet-A on the audio demo's 40x80 log-mels, 48x128x3x5
    with K=7: 2.6 vs 0.2 ms), and the added zeros of dy add nothing to any sum."""
    pad = d * (k // 2)
    grow_h, grow_w = max(0, pad + 1 - x.shape[-2]), max(0, pad + 1 - x.shape[-1])
    if grow_h or grow_w:
        x, dy = F.pad(x, (0, grow_w, 0, grow_h)), F.pad(dy, (0, grow_w, 0, grow_h))
    b, c, h, w = x.shape
    # (H, W, B*C) memory = channels_last (1, B*C, H, W): one copy from either input layout
    xi = x.permute(2, 3, 0, 1).reshape(h, w, b * c).permute(2, 0, 1).unsqueeze(0)
    g = F.conv2d(xi, dy.reshape(b * c, 1, h, w), padding=pad, stride=d, groups=b * c)
    return g.view(b, c, k, k).sum(0).unsqueeze(1)


def fft_size(n: int) -> int:
    """Smallest even 2^a 3^b 5^c >= n: MKL's FFT is 1.5-3x faster on those lengths than on primes
    or odd lengths (measured 45 vs 48 on 32x80 planes)."""
    m = n + n % 2
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 2


def _wgrad_fft(dy: Tensor, x: Tensor, k: int, d: int) -> Tensor:
    """Cross-correlation theorem: ``corr[s] = sum_y x[y + s] dy[y] = irfft(rfft(x) * conj(rfft(dy)))``
    for shifts |s| <= p = d*(K//2), per channel, with the batch sum taken on the spectra. FFT length
    >= H + p keeps the circular wrap inside x's zero padding, so the result is exact up to rounding."""
    b, c, h, w = x.shape
    p = d * (k // 2)
    nh, nw = fft_size(h + p), fft_size(w + p)
    # zero-pad explicitly: rfft2(x, s=...) pads internally but measured 1.5-3x slower
    fx = torch.fft.rfft2(F.pad(x, (0, nw - w, 0, nh - h)))
    fy = torch.fft.rfft2(F.pad(dy, (0, nw - w, 0, nh - h)))
    corr = torch.fft.irfft2((fx * fy.conj()).sum(0), s=(nh, nw))
    rows = torch.arange(-p, p + 1, d) % nh  # negative shifts sit at the end of the circular result
    cols = torch.arange(-p, p + 1, d) % nw
    return corr[:, rows[:, None], cols[None, :]].unsqueeze(1)


def _wgrad_scale(dy: Tensor, x: Tensor, k: int, d: int) -> Tensor:
    """K = 1: the gradient of a per-channel scale, ``sum_{b,y,x} x * dy``."""
    return (x * dy).sum((0, 2, 3)).view(-1, 1, 1, 1)


def _wgrad_phases(dy: Tensor, x: Tensor, k: int, d: int) -> Tensor:
    """The undilated weight gradient of the d*d phases (:func:`to_phases`): every sample and phase adds to it."""
    return weight_grad(to_phases(dy, d), to_phases(x, d), k, 1)


_WGRAD = {"aten": aten_weight_grad, "batch": _wgrad_batch, "fft": _wgrad_fft, "phases": _wgrad_phases,
          "scale": _wgrad_scale}
