"""Triton kernels for the depthwise, stride-1, 'same'-padded convolution behind ``uniperc.ops.dwconv2d``.

Import this module only through :mod:`uniperc.ops.dwconv`; it needs ``triton``. Whether the kernels
run compiled (CUDA) or under the Triton interpreter (CPU tensors) is fixed when this module is
imported, because ``@triton.jit`` reads ``TRITON_INTERPRET`` at decoration time: :data:`INTERPRETED`
records which one it was.

Two kernels, both working on any NCHW / channels_last strides (the layout only decides which tile
shapes coalesce, so each layout gets its own autotuned config list):

* ``_dwconv_fwd_kernel`` -- one program computes a ``BLOCK_C x (BLOCK_H*BLOCK_W)`` output tile
  (one channel plane's ``BLOCK_H x BLOCK_W`` rows x cols tile for NCHW, a block of channels x a small
  pixel tile for channels_last), looping over the K*K taps ``BLOCK_T`` at a time into a
  ``BLOCK_C x BLOCK_T x BLOCK_P`` fp32 accumulator that is summed over taps once at the end; bias and
  the per-channel affine ``y * scale + shift`` are applied in the epilogue. (fp64 inputs accumulate
  in fp64 instead, so float64 equivalence checks stay exact.) The input gradient is this
  same kernel run on the output gradient with the flipped kernel (and ``scale`` as the epilogue
  multiplier, since a depthwise conv commutes with a per-channel scale).
  Triton exposes no shared memory, so the halo reuse between neighbouring taps comes from L1/L2
  (the taps of one tile read overlapping windows), not from an explicit staged tile.
* ``_dwconv_wgrad_kernel`` -- ``dW[c, kh, kw] = sum_{b,h,w} dY[b,c,h,w] * X[b,c,h+kh*d-p,w+kw*d-p]``.
  One program owns ``BLOCK_C`` channels x ``BLOCK_T`` taps and one of ``n_split`` slices of the
  (batch x pixel-tile) reduction; it keeps a ``BLOCK_C x BLOCK_T x BLOCK_P`` fp32 accumulator (the
  ``dY`` tile is loaded once per step and reused by all ``BLOCK_T`` taps), reduces it over pixels at
  the end and writes one fp32 partial sum; torch then sums the ``n_split`` partials (deterministic,
  no atomics).

Indexing is int32 within one sample (the caller checks ``C*H*W < 2**31``) and int64 for the batch
offset.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _tap_window(oh, ow, offs_t, K, DIL, H, W, sh, sw):
    """Offsets (BLOCK_T, BLOCK_P) of the input pixel each tap reads for each output pixel, and the
    mask of those inside the image ('same' zero padding) for real taps and real output pixels."""
    pad = (K // 2) * DIL
    ih = oh[None, :] + ((offs_t // K) * DIL - pad)[:, None]
    iw = ow[None, :] + ((offs_t % K) * DIL - pad)[:, None]
    ok = (offs_t < K * K)[:, None] & ((oh < H) & (ow < W))[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return ih * sh + iw * sw, ok


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
    C, H, W, K, DIL,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # axis 0 walks the pixel tiles of one sample before the next sample, so programs that run
    # together share halos in L2; axis 1 picks the channel block.
    n_th = tl.cdiv(H, BLOCK_H)
    n_tw = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    b = pid // (n_th * n_tw)
    tile = pid % (n_th * n_tw)

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = (tile // n_tw) * BLOCK_H + offs_p // BLOCK_W
    ow = (tile % n_tw) * BLOCK_W + offs_p % BLOCK_W
    c_ok = offs_c < C
    x_planes = x_ptr + b.to(tl.int64) * sxb + offs_c[:, None, None] * sxc

    # BLOCK_T taps per step, each with its own accumulator slice (ACC: fp32, or fp64 for fp64 inputs):
    # the loop body is purely element-wise (BLOCK_T independent loads in flight), and the taps are summed once at the end.
    acc = tl.zeros((BLOCK_C, BLOCK_T, BLOCK_H * BLOCK_W), dtype=ACC)
    for t0 in range(0, K * K, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        off, ok = _tap_window(oh, ow, offs_t, K, DIL, H, W, sxh, sxw)
        xv = tl.load(x_planes + off[None, :, :], mask=c_ok[:, None, None] & ok[None, :, :], other=0.0)
        wv = tl.load(w_ptr + offs_c[:, None] * (K * K) + offs_t[None, :],
                     mask=c_ok[:, None] & (offs_t < K * K)[None, :], other=0.0)
        acc += xv.to(ACC) * wv.to(ACC)[:, :, None]
    out = tl.sum(acc, axis=1)

    if HAS_BIAS:
        out += tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[:, None]
    if HAS_SCALE:
        out *= tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[:, None]
    if HAS_SHIFT:
        out += tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[:, None]

    out_ok = c_ok[:, None] & ((oh < H) & (ow < W))[None, :]
    y_tile = y_ptr + b.to(tl.int64) * syb + offs_c[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(y_tile, out.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _dwconv_wgrad_kernel(
    gy_ptr, x_ptr, part_ptr,
    B, C, H, W, K, DIL, N_SPLIT,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pid_s = tl.program_id(2)
    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    c_ok = offs_c < C

    n_th = tl.cdiv(H, BLOCK_H)
    n_tw = tl.cdiv(W, BLOCK_W)
    n_items = B * n_th * n_tw

    acc = tl.zeros((BLOCK_C, BLOCK_T, BLOCK_H * BLOCK_W), dtype=ACC)
    for item in range(pid_s, n_items, N_SPLIT):
        b = item // (n_th * n_tw)
        tile = item % (n_th * n_tw)
        oh = (tile // n_tw) * BLOCK_H + offs_p // BLOCK_W
        ow = (tile % n_tw) * BLOCK_W + offs_p % BLOCK_W
        p_ok = (oh < H) & (ow < W)
        # the dY tile is loaded once and reused by all BLOCK_T taps
        gy = tl.load(gy_ptr + b.to(tl.int64) * sgb + offs_c[:, None] * sgc + (oh * sgh + ow * sgw)[None, :],
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        off, ok = _tap_window(oh, ow, offs_t, K, DIL, H, W, sxh, sxw)
        xv = tl.load(x_ptr + b.to(tl.int64) * sxb + offs_c[:, None, None] * sxc + off[None, :, :],
                     mask=c_ok[:, None, None] & ok[None, :, :], other=0.0).to(ACC)
        acc += gy[:, None, :] * xv

    part = tl.sum(acc, axis=2)
    out = part_ptr + pid_s * (C * K * K) + offs_c[:, None] * (K * K) + offs_t[None, :]
    tl.store(out, part, mask=c_ok[:, None] & (offs_t < K * K)[None, :])


#: True when the kernels above were decorated under ``TRITON_INTERPRET=1`` (CPU tensors only).
INTERPRETED = isinstance(_dwconv_fwd_kernel, InterpretedFunction)

# The interpreter runs one fixed config (autotuning there would only multiply the already slow
# interpreted runtime, which is dominated by the number of loop steps, hence the wide tap block).
# Channel block 2 and an 8 x 16 pixel tile leave partial tiles on the typical 3-channel 9 x 11 test
# shapes; a 128-tap block leaves a partial tap block for every odd K > 1.
INTERPRETER_FWD_CONFIG = dict(BLOCK_C=2, BLOCK_T=128, BLOCK_H=8, BLOCK_W=16)
INTERPRETER_WGRAD_CONFIG = dict(BLOCK_C=2, BLOCK_T=128, BLOCK_H=8, BLOCK_W=16)

_KEY = ["K", "H", "W", "C", "DIL"]  # the autotuner appends the dtypes of the tensor arguments itself


def _configs(blocks, num_warps=(4, 8)):
    """One config per (BLOCK_C, BLOCK_T, BLOCK_H, BLOCK_W) tuple and warp count."""
    return [triton.Config(dict(BLOCK_C=c, BLOCK_T=t, BLOCK_H=h, BLOCK_W=w), num_warps=nw, num_stages=1)
            for c, t, h, w in blocks for nw in num_warps]


# H100 starting points, not yet measured on a GPU. NCHW wants long contiguous rows of one plane;
# channels_last wants a wide (contiguous) channel block over a small pixel tile. The accumulator is
# BLOCK_C*BLOCK_T*BLOCK_H*BLOCK_W fp32 values: at most 4096 (32 registers a thread at 4 warps).
_FWD_NCHW = triton.autotune(_configs([(1, 4, 8, 64), (1, 8, 8, 32), (1, 8, 16, 32), (1, 16, 8, 16),
                                       (1, 4, 16, 64)]), key=_KEY)(_dwconv_fwd_kernel)
_FWD_CL = triton.autotune(_configs([(32, 4, 4, 8), (64, 2, 4, 8), (64, 4, 2, 8), (128, 2, 2, 8),
                                     (32, 8, 2, 8)]), key=_KEY)(_dwconv_fwd_kernel)
_WGRAD_NCHW = triton.autotune(_configs([(1, 8, 8, 32), (1, 16, 4, 32), (1, 16, 8, 16), (1, 32, 4, 16),
                                         (1, 4, 16, 32)]), key=_KEY)(_dwconv_wgrad_kernel)
_WGRAD_CL = triton.autotune(_configs([(32, 8, 2, 8), (64, 4, 2, 8), (32, 16, 2, 4), (64, 8, 1, 8),
                                       (128, 4, 2, 4)]), key=_KEY)(_dwconv_wgrad_kernel)


#: The autotuned launchers by (kernel, layout).
TUNED = {("fwd", "nchw"): _FWD_NCHW, ("fwd", "channels_last"): _FWD_CL,
         ("wgrad", "nchw"): _WGRAD_NCHW, ("wgrad", "channels_last"): _WGRAD_CL}
_UNIT_STRIDES = {"nchw": {"sxw", "syw", "sgw"}, "channels_last": {"sxc", "syc", "sgc"}}
_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def compile_offline(which: str, layout: str, dtype: torch.dtype, config, arch: int = 90):
    """Lower one autotune ``config`` of kernel ``which`` ("fwd" | "wgrad") to a cubin for ``sm_<arch>``
    without a GPU (TTIR -> TTGIR -> LLIR -> PTX -> triton's own ptxas), as the JIT would on that GPU:
    the layout's unit stride is specialised to the constant 1 like the JIT does; bias/scale/shift on.
    Catches what the interpreter accepts but the compiler rejects, and shows register use."""
    if INTERPRETED:
        raise RuntimeError("compile_offline needs the compiled kernels; unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = TUNED[which, layout].fn
    consts = dict(config.kwargs, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, ACC=accumulator_dtype(dtype))
    sig, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr or p.name in _UNIT_STRIDES[layout]:
            sig[p.name], constexprs[p.name] = "constexpr", consts.get(p.name, 1)
        elif p.name.endswith("_ptr"):  # the weight-grad partial sums are in the accumulation dtype
            sig[p.name] = "*" + _TL_NAMES[torch.promote_types(dtype, torch.float32) if p.name == "part_ptr" else dtype]
        else:
            sig[p.name] = "i32"
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for fp32/bf16/fp16, fp64 for fp64 (kept exact for reparameterisation checks)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(t: torch.Tensor):
    return tuple(int(s) for s in t.stride())


def _is_channels_last(x: torch.Tensor) -> bool:
    """Picks the config list: channel-contiguous inputs coalesce along the channel block."""
    return x.shape[1] > 1 and x.stride(1) == 1


def forward(x, weight, bias, scale, shift, dilation: int, out: torch.Tensor) -> torch.Tensor:
    """``out = (conv(x, weight) + bias) * scale + shift``; returns ``out`` (any strides, x's shape).

    ``weight`` is ``(C, 1, K, K)``; bias/scale/shift are ``(C,)`` or None. Inputs are validated by
    the caller (``uniperc.ops.dwconv``)."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    y = out
    if y.numel() == 0:
        return y
    w = weight.reshape(C, K * K).contiguous()
    dummy = w  # stands in for absent bias/scale/shift; never read (the HAS_* flags are False)
    args = (x, w,
            bias.contiguous() if bias is not None else dummy,
            scale.contiguous() if scale is not None else dummy,
            shift.contiguous() if shift is not None else dummy,
            y, C, H, W, K, dilation, *_strides(x), *_strides(y))
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                 ACC=accumulator_dtype(x.dtype))

    def grid(meta):
        return (B * triton.cdiv(H, meta["BLOCK_H"]) * triton.cdiv(W, meta["BLOCK_W"]),
                triton.cdiv(C, meta["BLOCK_C"]))

    if INTERPRETED:
        _dwconv_fwd_kernel[grid(INTERPRETER_FWD_CONFIG)](*args, **flags, **INTERPRETER_FWD_CONFIG)
    else:
        kernel = _FWD_CL if _is_channels_last(x) else _FWD_NCHW
        kernel[grid](*args, **flags)
    return y


def _default_split(x: torch.Tensor, n_programs_without_split: int) -> int:
    """How many slices to cut the (batch x pixels) reduction into: enough programs for ~4 waves
    on the GPU, never more slices than 64 (the partial buffer is ``n_split x C x K*K`` fp32)."""
    if INTERPRETED:
        return 2  # exercises the partial-sum path on tiny test shapes
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(64, triton.cdiv(4 * sms, max(1, n_programs_without_split))))


def weight_grad(grad_out, x, kernel_size: int, dilation: int, n_split: int | None = None) -> torch.Tensor:
    """``dL/dweight`` of shape ``(C, 1, K, K)`` for ``y = dwconv(x, weight)`` (no affine), in fp32
    (fp64 for fp64 inputs).

    ``grad_out`` must have ``x``'s shape; any strides."""
    B, C, H, W = x.shape
    K = kernel_size
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return torch.zeros(C, 1, K, K, device=x.device, dtype=acc)
    channels_last = _is_channels_last(x)
    if n_split is None:
        # the largest channel/tap blocks of the configs bound the program count from below
        c_block, t_block = (128, 16) if channels_last else (1, 32)
        n_split = _default_split(x, triton.cdiv(C, c_block) * triton.cdiv(K * K, t_block))
    if n_split < 1:
        raise ValueError(f"n_split must be >= 1, got {n_split}")
    partial = torch.empty(n_split, C, K * K, device=x.device, dtype=acc)
    args = (grad_out, x, partial, B, C, H, W, K, dilation, n_split, *_strides(grad_out), *_strides(x),
            accumulator_dtype(x.dtype))

    def grid(meta):
        return (triton.cdiv(C, meta["BLOCK_C"]), triton.cdiv(K * K, meta["BLOCK_T"]), n_split)

    if INTERPRETED:
        _dwconv_wgrad_kernel[grid(INTERPRETER_WGRAD_CONFIG)](*args, **INTERPRETER_WGRAD_CONFIG)
    else:
        kernel = _WGRAD_CL if channels_last else _WGRAD_NCHW
        kernel[grid](*args)
    return partial.sum(0).view(C, 1, K, K)
