"""The GPU check, one command: ``python -m uniperc.bench gpu [--json PATH]``.

Why one command: a GPU is lent to this project rarely and for minutes, so everything worth knowing runs in
one go and fits in 10 minutes on one H100/H200:

1. **correctness** of the fused op compiled for the GPU (the Triton kernels, no interpreter): forward and
   every gradient (input, weight, bias, scale, shift) against ``F.conv2d`` + autograd in float64 on the same
   device, for K in {3, 7, 13, 31, 51} x dilation {1, 2} x fp32 / bf16 / fp16 x NCHW / channels_last, on an
   odd, non-square plane;
2. **speed**: :mod:`uniperc.bench.dwconv` (ours vs cuDNN, forward and fwd+bwd, achieved TFLOP/s and the
   ratio) for fp32 and bf16, K 7 / 13 / 31 / 51, NCHW and channels_last, batch 1 and 64.

The exit status is 1 when any correctness case is outside its tolerance (the speed table is printed anyway).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from uniperc.bench import dwconv as dwconv_bench
from uniperc.ops import dwconv as dw

CHECK_KERNELS = (3, 7, 13, 31, 51)
CHECK_DILATIONS = (1, 2)
CHECK_SHAPE = (2, 48, 37, 29)  # odd, non-square: the kernels' edge tiles are exercised
#: largest allowed max|ours - ref| / max|ref| per dtype (inputs rounded to the dtype; fp32 accumulation)
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
BENCH_SHAPES = "1x384x64x64,64x384x32x32"
BENCH_KERNELS = "7,13,31,51"


def check_correctness(device: torch.device, backend: str = "triton", kernels=CHECK_KERNELS,
                      dilations=CHECK_DILATIONS, dtypes=tuple(TOLERANCE), shape=CHECK_SHAPE) -> list[dict]:
    """One row per case: the largest relative error of the output and of each gradient, and ``ok``."""
    rows = []
    old = dw.get_backend()
    dw.set_backend(backend)
    try:
        for dname in dtypes:
            for lname, fmt in dwconv_bench._LAYOUTS.items():
                for k in kernels:
                    for d in dilations:
                        rows.append(_check_case(device, dname, fmt, lname, k, d, shape))
    finally:
        dw.set_backend(old)
    return rows


def _check_case(device, dname, fmt, lname, k, d, shape) -> dict:
    b, c, h, w = shape
    g = torch.Generator().manual_seed(k * 10 + d)
    dtype = dwconv_bench._DTYPES[dname]
    # the reference sees exactly the rounded low-precision inputs
    leaves = [torch.randn(b, c, h, w, generator=g), torch.randn(c, 1, k, k, generator=g) / k,
              torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)]
    low = [t.to(dtype) for t in leaves]
    low[0] = low[0].contiguous(memory_format=fmt)
    ours = [t.to(device).clone().requires_grad_() for t in low]  # clone keeps the layout
    ref = [t.to(device, torch.float64).detach().requires_grad_() for t in low]
    gy = torch.randn(b, c, h, w, generator=g).to(dtype)
    y = dw.dwconv2d(ours[0], ours[1], ours[2], dilation=d, scale=ours[3], shift=ours[4])
    x, wt, bias, scale, shift = ref
    yr = F.conv2d(x, wt, bias, padding=d * (k // 2), dilation=d, groups=c) * scale.view(1, -1, 1, 1) \
        + shift.view(1, -1, 1, 1)
    y.backward(gy.to(device).contiguous(memory_format=fmt))
    yr.backward(gy.to(device, torch.float64))
    errors = {}
    for name, a, r in zip(("y", "dx", "dw", "db", "dscale", "dshift"), [y] + [t.grad for t in ours],
                          [yr] + [t.grad for t in ref]):
        errors[name] = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    worst = max(errors.values())
    return dict(dtype=dname, layout=lname, K=k, dilation=d, **errors, worst=worst,
                ok=worst <= TOLERANCE[dname] and y.is_contiguous(memory_format=fmt))


def format_check(rows: list[dict]) -> str:
    lines = [f"{'dtype':5} {'layout':13} {'K':>3} {'d':>2} {'y':>9} {'dx':>9} {'dw':>9} {'db':>9} "
             f"{'dscale':>9} {'dshift':>9}  ok"]
    for r in rows:
        lines.append(f"{r['dtype']:5} {r['layout']:13} {r['K']:>3} {r['dilation']:>2} " + " ".join(
            f"{r[n]:9.2e}" for n in ("y", "dx", "dw", "db", "dscale", "dshift")) + f"  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uniperc.bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write {'correctness': [...], 'speed': [...]} as JSON")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per speed case")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("bench gpu: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "on a CPU use `python -m uniperc.bench dwconv_cpu`")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}", flush=True)
    check = check_correctness(device)
    print(format_check(check), flush=True)
    failed = [r for r in check if not r["ok"]]
    print(f"correctness: {len(check) - len(failed)}/{len(check)} cases within tolerance {TOLERANCE}", flush=True)
    bench_args = dwconv_bench.build_parser().parse_args(
        ["--device", "cuda", "--shapes", BENCH_SHAPES, "--kernels", BENCH_KERNELS, "--dtypes", "fp32,bf16",
         "--layouts", "nchw,channels_last", "--backend", "triton", "--iters", str(args.iters)])
    speed = dwconv_bench.run_benchmark(bench_args)
    print(dwconv_bench.format_rows(speed), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"correctness": check, "speed": speed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
