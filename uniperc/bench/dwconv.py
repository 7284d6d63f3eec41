"""Benchmark ``uniperc.ops.dwconv2d`` against ``F.conv2d`` (cuDNN on a GPU) in the same run.

``python -m uniperc.bench dwconv [flags]`` (or ``python -m uniperc.bench.dwconv``). For every dtype x
layout x shape x kernel size it times the forward and forward+backward of both implementations and
prints milliseconds, the speed ratio (``F.conv2d`` time / ours, > 1 means ours is faster), achieved
TFLOP/s and the percentage of the assumed FP32 CUDA-core peak. FLOPs are counted as ``2*K*K*B*C*H*W``
per forward and three times that for forward+backward (input and weight gradients each cost one
forward); padding taps are counted as done, as every direct implementation does them.

A large-K depthwise conv is compute-bound (about ``2*K*K`` FLOP per element read and written), which
is why the non-tensor-core FP32 peak is the yardstick, for bf16 too (neither implementation uses
tensor cores). On the CPU the op runs :mod:`uniperc.ops.dwconv_cpu` (unless ``--backend triton`` under
``TRITON_INTERPRET=1``); ``python -m uniperc.bench dwconv_cpu`` is the CPU benchmark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from uniperc.ops import dwconv as dw

DEFAULT_SHAPES = "64x384x32x32,64x128x64x64,1x384x64x64"
DEFAULT_KERNELS = "7,13,31,51"
#: H100 SXM: 132 SMs x 128 FP32 lanes x 2 FLOP x ~1.98 GHz boost ~= 67 TFLOP/s (non-tensor FP32).
H100_SXM_FP32_TFLOPS = 67.0
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _csv(parse):
    def inner(text: str):
        try:
            return [parse(v) for v in text.split(",") if v]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from exc
    return inner


def _shape(text: str):
    parts = text.lower().split("x")
    if len(parts) != 4:
        raise ValueError(f"shape {text!r} must be BxCxHxW")
    return tuple(int(p) for p in parts)


def _choice(table):
    def inner(text: str):
        if text not in table:
            raise ValueError(f"{text!r} is not one of {sorted(table)}")
        return text
    return inner


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uniperc.bench dwconv", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=_csv(_shape), default=_csv(_shape)(DEFAULT_SHAPES), help="BxCxHxW,...")
    p.add_argument("--kernels", type=_csv(int), default=_csv(int)(DEFAULT_KERNELS), help="odd K,...")
    p.add_argument("--dtypes", type=_csv(_choice(_DTYPES)), default=["bf16", "fp32"], help="bf16,fp32,fp16")
    p.add_argument("--layouts", type=_csv(_choice(_LAYOUTS)), default=["nchw"], help="nchw,channels_last")
    p.add_argument("--modes", type=_csv(_choice({"fwd": 0, "fwdbwd": 0})), default=["fwd", "fwdbwd"])
    p.add_argument("--backend", choices=dw.BACKENDS, default="auto", help="uniperc.ops backend for 'ours'")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_FP32_TFLOPS,
                   help="FP32 CUDA-core peak used for the %%-of-peak column (default: H100 SXM)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    p.add_argument("--codegen", type=int, metavar="SM", help="no timing: compile every autotune config of the Triton "
                   "kernels for sm_SM (e.g. 90 for H100; no GPU needed) and print registers / stack per config")
    return p


def _time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU, so launch overhead is included
    the way a training step sees it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _case_fns(impl, x, w, mode):
    if mode == "fwd":
        return lambda: impl(x, w)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    gy = torch.randn_like(x)
    return lambda: torch.autograd.grad(impl(xg, wg), (xg, wg), gy)


def _ours(x, w):
    return dw.dwconv2d(x, w)


def _cudnn(x, w):
    k = w.shape[-1]
    return F.conv2d(x, w, padding=k // 2, groups=x.shape[1])


def run_benchmark(args) -> list[dict]:
    """Time every configuration; returns one dict per (dtype, layout, shape, K, mode)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm too
    rows = []
    old_backend = dw.get_backend()
    dw.set_backend(args.backend)
    try:
        for dname in args.dtypes:
            for lname in args.layouts:
                for (b, c, h, w_) in args.shapes:
                    for k in args.kernels:
                        gen = torch.Generator().manual_seed(0)
                        x = torch.randn(b, c, h, w_, generator=gen).to(device, _DTYPES[dname])
                        x = x.contiguous(memory_format=_LAYOUTS[lname])
                        wt = (torch.randn(c, 1, k, k, generator=gen) / k).to(device, _DTYPES[dname])
                        for mode in args.modes:
                            flop = 2 * k * k * b * c * h * w_ * (3 if mode == "fwdbwd" else 1)
                            ours = _time_ms(_case_fns(_ours, x, wt, mode), device, args.warmup, args.iters)
                            ref = _time_ms(_case_fns(_cudnn, x, wt, mode), device, args.warmup, args.iters)
                            rows.append(dict(
                                dtype=dname, layout=lname, shape=[b, c, h, w_], K=k, mode=mode, flop=flop,
                                ours_ms=ours, conv2d_ms=ref, ratio=ref / ours,
                                ours_tflops=flop / ours / 1e9, conv2d_tflops=flop / ref / 1e9,
                                ours_pct_peak=100 * flop / ours / 1e9 / args.peak_tflops))
    finally:
        dw.set_backend(old_backend)
    return rows


def codegen_report(args) -> list[dict]:
    """Compile every (kernel, layout, config, dtype) for ``sm_<args.codegen>`` and read the register and
    stack (spill) use of each cubin with the ``cuobjdump`` that ships with triton."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    from uniperc.ops import _triton_dwconv as kernels

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for dname in args.dtypes:
        for layout in args.layouts:
            for which in ("fwd", "wgrad"):
                for cfg in kernels.TUNED[which, layout].configs:
                    compiled = kernels.compile_offline(which, layout, _DTYPES[dname], cfg, arch=args.codegen)
                    with tempfile.TemporaryDirectory() as tmp:
                        path = os.path.join(tmp, "k.cubin")
                        with open(path, "wb") as f:
                            f.write(compiled.asm["cubin"])
                        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                                               check=True).stdout
                    regs, stack = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage).groups()
                    rows.append(dict(kernel=which, layout=layout, dtype=dname, config=dict(cfg.kwargs),
                                     num_warps=cfg.num_warps, registers=int(regs), stack_bytes=int(stack)))
                    print(f"{which:5} {layout:13} {dname:4} {cfg.kwargs} warps={cfg.num_warps}: "
                          f"{regs} registers, {stack} B stack", flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'dtype':5} {'layout':13} {'B x C x H x W':17} {'K':>3} {'mode':6} {'ours ms':>9} "
            f"{'conv2d ms':>9} {'ratio':>6} {'ours TF/s':>9} {'%peak':>6} {'conv2d TF/s':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(v) for v in r["shape"])
        lines.append(f"{r['dtype']:5} {r['layout']:13} {shape:17} {r['K']:>3} {r['mode']:6} {r['ours_ms']:9.3f} "
                     f"{r['conv2d_ms']:9.3f} {r['ratio']:6.2f} {r['ours_tflops']:9.3g} {r['ours_pct_peak']:6.3g} "
                     f"{r['conv2d_tflops']:11.3g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for k in args.kernels:
        if k % 2 == 0 or not 1 <= k <= dw.MAX_KERNEL_SIZE:
            raise ValueError(f"--kernels: K={k} must be odd and at most {dw.MAX_KERNEL_SIZE}")
    if args.codegen is not None:
        rows = codegen_report(args)
        print(f"{len(rows)} variants compiled for sm_{args.codegen}; registers {min(r['registers'] for r in rows)}-"
              f"{max(r['registers'] for r in rows)}, largest stack (spills) {max(r['stack_bytes'] for r in rows)} B")
    else:
        device = torch.device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        ours = "Triton" if (args.backend == "triton" or (args.backend == "auto" and device.type == "cuda")) \
            else "torch ops"
        print(f"device: {name}; ours = uniperc.ops.dwconv2d (backend {args.backend!r} -> {ours}); "
              f"assumed FP32 CUDA-core peak: {args.peak_tflops:g} TFLOP/s (--peak-tflops)")
        print("ratio = F.conv2d time / ours time (> 1: ours faster); "
              "FLOP = 2*K*K*B*C*H*W per forward, x3 for fwd+bwd")
        rows = run_benchmark(args)
        print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
