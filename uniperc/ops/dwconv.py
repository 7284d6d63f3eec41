"""Large-kernel depthwise convolution entry point.

Every depthwise conv with K >= 7 in uniperc goes through :func:`dwconv2d` (or the :class:`DWConv2d`
module), so one switch picks the implementation:

* ``"torch"``  -- plain torch ops, exact on any device: ``F.conv2d`` (+ the affine), and on CPU
  tensors the algorithms of :mod:`uniperc.ops.dwconv_cpu` (a layout per kernel size for the forward,
  batch-as-channels or FFT for the weight gradient), 2-40x faster than aten's own CPU kernels.
* ``"triton"`` -- the Triton kernels in :mod:`uniperc.ops._triton_dwconv`. On CUDA tensors they are
  compiled; on CPU tensors they run under the Triton interpreter, which must have been enabled with
  ``TRITON_INTERPRET=1`` before triton was imported (otherwise a ``RuntimeError`` says so).
* ``"auto"`` (default) -- Triton on CUDA tensors (when triton is installed), torch elsewhere.

The switch is :func:`set_backend` or the ``UNIPERC_DWCONV`` environment variable (read at import).

Both backends sit behind one ``torch.library`` custom op, ``uniperc::dwconv2d``, with a fake
(meta) implementation and a registered autograd formula, so autograd, ``torch.compile`` and
``torch.export`` see a single opaque op. Its backward uses two ops: the input gradient is the same
``uniperc::dwconv2d`` op applied to the output gradient with the flipped kernel (stride 1, odd K,
'same' padding make the transposed conv a plain conv), and the weight gradient is
``uniperc::dwconv2d_weight_grad`` (a per-(c, kh, kw) reduction over batch and pixels). The bias and
affine gradients follow from that reduction in closed form (see :func:`_backward`), so the forward
output is never stored or recomputed.

In eager mode on the CPU, where the custom op's Python dispatch (about 0.1 ms per forward + backward) weighs on
small planes, :func:`dwconv2d` skips it: a conv whose reach is 3x3 at dilation 1 (where the op would only wrap
aten's own kernels) runs as plain ``F.conv2d`` (:func:`_aten_throughout`), every other one through
:class:`_EagerCPU`, an ``autograd.Function`` over the op's own functions (same results, bit for bit). Compiled
and exported graphs keep the op.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import importlib.util
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import dwconv_cpu

#: Largest odd kernel size accepted. The kernels loop over taps at run time, so this is not a
#: hardware limit; it bounds the K*K partial-sum buffer of the weight gradient and is the range tested.
MAX_KERNEL_SIZE = 127
BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "UNIPERC_DWCONV"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: exact reparam checks
#: Lists that :func:`recording_calls` fills; empty (the usual case) costs one truth test per call.
_RECORDERS: list[list] = []


def _parse_backend(name, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown dwconv backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


_backend = _parse_backend(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def set_backend(name: str) -> None:
    """Pick the implementation of every :func:`dwconv2d` / :class:`DWConv2d` call:
    ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring)."""
    global _backend
    _backend = _parse_backend(name, "set_backend")


def get_backend() -> str:
    """The current switch value (``"auto"``, ``"triton"`` or ``"torch"``)."""
    return _backend


def _triton_kernels():
    """The Triton kernel module, imported on first use (so the torch path never needs triton)."""
    try:
        return importlib.import_module("uniperc.ops._triton_dwconv")
    except ImportError as exc:  # triton missing or broken
        raise RuntimeError(f"dwconv backend 'triton' needs the triton package: {exc}") from exc


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _uses_triton(x: Tensor) -> bool:
    """Resolve the switch for one call on ``x``'s device."""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return x.is_cuda and _triton_installed()
    if x.is_cuda:
        return True
    if x.device.type == "cpu":
        kernels = _triton_kernels()
        if not kernels.INTERPRETED:
            raise RuntimeError(
                "dwconv backend 'triton' got CPU tensors, which needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is first imported "
                "(or use set_backend('auto') / 'torch' for the F.conv2d path)")
        return True
    raise RuntimeError(f"dwconv backend 'triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                       f"got a tensor on {x.device}")


def _memory_format(x: Tensor) -> torch.memory_format:
    """Layout of the output (and of the gradients fed to the kernels): ``x``'s own. The fake
    implementation promises exactly this."""
    return dwconv_cpu.layout(x)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation / weight-gradient dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _empty_output(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=_memory_format(x))


# ---------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("uniperc::dwconv2d", mutates_args=())
def _dwconv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                 shift: Optional[Tensor], dilation: int) -> Tensor:
    """``(dwconv(x, weight) + bias) * scale + shift``; inputs already validated by :func:`dwconv2d`."""
    return _forward(x, weight, bias, scale, shift, dilation)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
             shift: Optional[Tensor], dilation: int) -> Tensor:
    """What ``uniperc::dwconv2d`` computes, as a plain function (the op's body and :class:`_EagerCPU`'s)."""
    if _uses_triton(x):
        return _triton_kernels().forward(x, weight, bias, scale, shift, dilation, out=_empty_output(x))
    k = weight.shape[-1]
    if x.device.type == "cpu":  # taps that only meet the padding are dropped first (exact); fp32 for bf16 / fp16
        k = dwconv_cpu.reach(k, dilation, x.shape[-2], x.shape[-1])
        y = dwconv_cpu.forward(x, dwconv_cpu.centre(weight, k), bias, dilation)
    else:
        y = F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation, groups=x.shape[1])
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    # the promised strides, read off a meta tensor: an unused real allocation here costs page faults
    # (8x40x56x56, K=3 on CPU: 4.4 vs 1.2 ms per call)
    promised = torch.empty_like(x, memory_format=_memory_format(x), device="meta")
    if y.dtype == x.dtype and y.stride() == promised.stride():
        return y
    return _empty_output(x).copy_(y)


@_dwconv2d_op.register_fake
def _dwconv2d_fake(x, weight, bias, scale, shift, dilation):
    return _empty_output(x)


@torch.library.custom_op("uniperc::dwconv2d_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: Tensor, x: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """Gradient ``(C, 1, K, K)`` of ``sum(grad_out * dwconv(x, w))`` w.r.t. ``w``, in the accumulation
    dtype (fp32, fp64 for fp64 inputs) so the affine gradients derived from it keep full precision."""
    return _weight_grad(grad_out, x, kernel_size, dilation)


def _weight_grad(grad_out: Tensor, x: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """What ``uniperc::dwconv2d_weight_grad`` computes, as a plain function."""
    if _uses_triton(x):
        return _triton_kernels().weight_grad(grad_out, x, kernel_size, dilation)
    k = kernel_size
    if x.device.type == "cpu":  # the taps that only meet the padding have a zero gradient, filled in below
        k = dwconv_cpu.reach(k, dilation, x.shape[-2], x.shape[-1])
        g = dwconv_cpu.weight_grad(grad_out, x, k, dilation)
    else:
        g = dwconv_cpu.aten_weight_grad(grad_out, x, k, dilation).to(_acc_dtype(x))
    q = (kernel_size - k) // 2
    return F.pad(g, (q, q, q, q)) if q else g


@_weight_grad_op.register_fake
def _weight_grad_fake(grad_out, x, kernel_size, dilation):
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size, dtype=_acc_dtype(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, dilation = inputs
    ctx.save_for_backward(x, weight, bias, scale)
    ctx.dilation = dilation


def _backward(ctx, grad_out):
    """The op's registered autograd formula: :func:`_gradients` through the two custom ops."""
    return _gradients(ctx, grad_out, _dwconv2d_op, _weight_grad_op)


def _gradients(ctx, grad_out, conv, weight_grad):
    """With ``z = conv(x, w) + b``, ``y = z * s + t`` and ``G = corr(x, dy)`` (the weight-grad op):
    ``dx = conv(dy, flip(w)) * s``, ``dw = G * s``, ``db = s * sum(dy)``, ``dt = sum(dy)`` and
    ``ds = sum(dy * z) = sum_ij(w * G) + b * sum(dy)`` -- no need to keep ``z`` from the forward."""
    x, weight, bias, scale = ctx.saved_tensors
    need_x, need_w, need_b, need_s, need_t, _ = ctx.needs_input_grad
    k, d, acc = weight.shape[-1], ctx.dilation, _acc_dtype(x)
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    gx = gw = gb = gs = gt = None
    if need_x:
        gx = conv(grad_out, weight.flip((-2, -1)), None, scale, None, d)
    s_acc = scale.to(acc) if scale is not None else None
    if need_w or need_s:
        g = weight_grad(grad_out, x, k, d)
        if need_w:
            gw = (g * s_acc.view(-1, 1, 1, 1) if s_acc is not None else g).to(weight.dtype)
            if gw.stride() != weight.stride():  # (C, 1, K, K): the size-1 dim's stride differs; DDP's buckets
                gw = torch.empty_like(weight).copy_(gw)  # expect the weight's exact strides (else a warning)
        if need_s:
            gs_acc = (g * weight.to(acc)).sum((1, 2, 3))
    if need_b or need_t or (need_s and bias is not None):
        dy_sum = grad_out.sum((0, 2, 3), dtype=acc)
        if need_b:
            gb = (dy_sum * s_acc if s_acc is not None else dy_sum).to(bias.dtype)
        if need_t:
            gt = dy_sum.to(grad_out.dtype)
    if need_s:
        if bias is not None:
            gs_acc = gs_acc + bias.to(acc) * dy_sum
        gs = gs_acc.to(scale.dtype)
    return gx, gw, gb, gs, gt, None


_dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCPU(torch.autograd.Function):
    """The op's forward and gradients without the custom op, for eager calls on CPU tensors: the same
    functions, minus the custom op's Python dispatch (about 0.1 ms per forward + backward, which made
    the op 0.67-0.87x of aten on the demo recipes' smallest stages, e.g. 16x48x4x4 with K = 5)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, dilation):
        _setup_context(ctx, (x, weight, bias, scale, shift, dilation), None)
        return _forward(x, weight, bias, scale, shift, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, _forward, _weight_grad)


# 2*K*K FLOPs per output element, so ``FlopCounterMode`` counts the op (it cannot see inside a custom op).
@register_flop_formula(torch.ops.uniperc.dwconv2d)
def _forward_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[-1] ** 2


@register_flop_formula(torch.ops.uniperc.dwconv2d_weight_grad)
def _weight_grad_flops(grad_out_shape, x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(grad_out_shape) * kernel_size ** 2


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _check_vector(name: str, v, x: Tensor) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise ValueError(f"{name} must be a Tensor or None, got {type(v).__name__}")
    if v.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) (one value per channel), got {tuple(v.shape)}")
    if v.dtype != x.dtype:
        raise ValueError(f"{name} dtype {v.dtype} does not match x dtype {x.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


def _validate(x, weight, bias, scale, shift, dilation) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) Tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    # Any batch / channel stride works (e.g. a channel slice of a bigger tensor), but the rows (NCHW)
    # or the channels (channels_last) must be unit-stride: other layouts are not what the kernels
    # are tiled for and usually mean a forgotten .contiguous().
    if not (x.stride(3) == 1 or x.shape[3] == 1 or x.stride(1) == 1 or x.shape[1] == 1):
        raise ValueError(f"x must be laid out as NCHW or channels_last (unit stride along W or along C), got "
                         f"strides {tuple(x.stride())} for shape {tuple(x.shape)}; call .contiguous() first")
    c = x.shape[1]
    span = sum((n - 1) * st for n, st in zip(x.shape[1:], x.stride()[1:]))
    if span >= 2 ** 31:
        raise ValueError(f"x: one sample spans {span + 1} elements in memory; at most 2**31 supported")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1 \
            or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (C, 1, K, K) = ({c}, 1, K, K) for a depthwise conv of x with "
                         f"{c} channels, got {tuple(getattr(weight, 'shape', ()))}")
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"weight kernel size K={k} must be odd ('same' padding is symmetric only for odd K)")
    if k > MAX_KERNEL_SIZE:
        raise ValueError(f"weight kernel size K={k} is larger than the supported maximum {MAX_KERNEL_SIZE}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    for name, v in (("bias", bias), ("scale", scale), ("shift", shift)):
        _check_vector(name, v, x)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")


def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dilation: int = 1,
             scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Depthwise, stride-1, 'same'-padded conv: ``(conv(x, weight) + bias) * scale + shift``.

    ``x`` is ``(B, C, H, W)`` in NCHW or channels_last layout (the output keeps it; batch and channel
    slices of a bigger tensor are fine), ``weight`` is
    ``(C, 1, K, K)`` with odd ``K <= MAX_KERNEL_SIZE``; ``bias``, ``scale``, ``shift`` are ``(C,)``
    or None (``scale``/``shift`` carry a folded BatchNorm or a layer scale). fp32, bf16 and fp16 (and
    fp64, accumulated in fp64, for exactness checks), all
    arguments of one dtype and device -- except under ``torch.autocast``, where, like ``F.conv2d``,
    every argument is cast to the autocast dtype first. Bad arguments raise ``ValueError``.
    """
    if isinstance(x, Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, scale, shift = (
            v.to(dt) if isinstance(v, Tensor) and v.is_floating_point() else v
            for v in (x, weight, bias, scale, shift))
    _validate(x, weight, bias, scale, shift, dilation)
    if _RECORDERS:
        _RECORDERS[-1].append((*x.shape, weight.shape[-1], dilation))
    if _eager_cpu(x):
        if _aten_throughout(x, weight, dilation):
            return _aten_dwconv2d(x, weight, bias, scale, shift)
        return _EagerCPU.apply(x, weight, bias, scale, shift, dilation)
    return _dwconv2d_op(x, weight, bias, scale, shift, dilation)


def _eager_cpu(x: Tensor) -> bool:
    """A call on CPU tensors with the torch backend, outside ``torch.compile`` / ``torch.export`` (which keep
    the one opaque op): :func:`dwconv2d` may then skip the custom op's dispatch."""
    return x.device.type == "cpu" and not _uses_triton(x) and not torch.compiler.is_compiling()


def _aten_throughout(x: Tensor, weight: Tensor, dilation: int) -> bool:
    """Whether an eager CPU call is plain ``F.conv2d`` autograd: in fp32 / fp64, where the op would run aten's
    kernels throughout (:func:`dwconv_cpu.aten_throughout`): a 3x3 kernel, or a larger one of which only the
    centre 3x3 reaches the plane (:func:`dwconv_cpu.reach`; K = 5 or 7 on a 2x2 plane). There the op adds only
    its Python dispatch, which made every 3x3 depthwise conv 0.6-0.9x of aten's (UniRepLKNet-A's stage 1,
    8x40x56x56) and K=5 on 16x96x2x2 0.54x."""
    return x.dtype in (torch.float32, torch.float64) and dwconv_cpu.aten_throughout(
        dwconv_cpu.reach(weight.shape[-1], dilation, *x.shape[-2:]), dilation, dwconv_cpu.layout(x))


def _aten_dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                   shift: Optional[Tensor]) -> Tensor:
    """What the op computes, as aten ops, on the 3x3 centre of the kernel (the other taps only meet the
    padding; their gradient is zero, as the op's). On a channels_last input aten hands the ``(C, 1, K, K)``
    weight gradient back with another stride in its size-1 dim than the weight's, which DDP's gradient buckets
    warn about. Passing the weight through a flatten and back puts the gradient in the weight's strides (the
    backward of a view recomputes them), as the op's own backward does, for two view nodes instead of a copy."""
    if dwconv_cpu.layout(x) == torch.channels_last:
        weight = weight.flatten(1).view_as(weight)
    y = F.conv2d(x, dwconv_cpu.centre(weight, 3), bias, padding=1, groups=x.shape[1])
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    return y if shift is None else y + shift.view(1, -1, 1, 1)


@contextlib.contextmanager
def recording_calls():
    """Inside the block, every :func:`dwconv2d` call appends ``(B, C, H, W, K, dilation)`` to the list it
    yields: the shapes a model really runs, for ``python -m uniperc.bench dwconv_cpu --run``."""
    calls: list[tuple] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


class DWConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same keys, init and timm tooling) for depthwise stride-1 'same' convs,
    routed through :func:`dwconv2d` (so the backend switch applies)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, dilation: int = 1):
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= MAX_KERNEL_SIZE:
            raise ValueError(f"kernel_size must be odd and at most {MAX_KERNEL_SIZE}, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=channels, bias=bias)

    def forward(self, x):
        return dwconv2d(x, self.weight, self.bias, dilation=self.dilation[0])
