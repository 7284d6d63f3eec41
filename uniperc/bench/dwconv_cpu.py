"""CPU benchmark of ``uniperc.ops.dwconv2d`` (its :mod:`uniperc.ops.dwconv_cpu` algorithms) against
PyTorch's own depthwise kernels in NCHW and in channels_last.

``python -m uniperc.bench dwconv_cpu [--threads 1] [--shapes BxCxHxWxK[xD],...] [--run OUTPUT_DIR]``
(``--run``: the shapes of a training run's model instead, train form at the run's batch size). Per shape it prints the
median wall time (ms) of forward+backward (input and weight gradients) of ``F.conv2d`` and of the op, each on
an NCHW and on a channels_last input; the op's speed-up over aten on the same layout (NCHW, channels_last) and
of the op's better layout over aten's better one ("best"); the op's forward alone (NCHW input) and its ratio
fwd+bwd / fwd (3 would mean a backward as cheap as two forwards).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from uniperc.ops import dwconv as dw

from ._timing import median_seconds

#: The issue's shapes, then real stages: unireplknet_a at 224 (dims 40/80/160/320, K 3/13/13/13 at
#: 56/28/14/7, batch 8), its dilated branches (5 d2, 3 d4, 3 d5), VAN's 7x7 d=3 at two stages, pelk_t's
#: stage-1 K=51 plane, a K=31 plane, K=1 and a K=7 kernel on a 1x1 plane (a small input's last stage).
DEFAULT_SHAPES = ("8x64x56x51x51,8x128x28x49x49,32x80x32x32x13,32x320x8x8x13,"
                  "8x40x56x56x3,8x80x28x28x13,8x160x14x14x13,8x320x7x7x13,8x80x28x28x5x2,8x80x28x28x7x3,"
                  "8x40x56x56x7x3,8x80x28x28x3x4,8x160x14x14x3x5,8x64x56x56x31,8x80x28x28x1,64x256x1x1x7")


def _shape(text: str):
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) not in (5, 6) or parts[4] % 2 == 0:
        raise ValueError(f"shape {text!r} must be BxCxHxWxK or BxCxHxWxKxD with odd K")
    return tuple(parts) if len(parts) == 6 else (*parts, 1)


def _fwdbwd(conv, x, w, gy):
    def step():
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        torch.autograd.grad(conv(xg, wg), (xg, wg), gy)
    return step


def measure(b, c, h, w, k, d, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    wt = torch.randn(c, 1, k, k, generator=g) / k
    cl = torch.channels_last

    def aten(x, w):
        return F.conv2d(x, w, padding=d * (k // 2), dilation=d, groups=c)

    def ours(x, w):
        return dw.dwconv2d(x, w, dilation=d)

    xc, gyc = x.contiguous(memory_format=cl), gy.contiguous(memory_format=cl)
    ms = {name: 1e3 * median_seconds(fn, repeats, warmup=1) for name, fn in (
        ("aten_nchw", _fwdbwd(aten, x, wt, gy)),
        ("aten_cl", _fwdbwd(aten, xc, wt, gyc)),
        ("ours", _fwdbwd(ours, x, wt, gy)),
        ("ours_cl", _fwdbwd(ours, xc, wt, gyc)),
        ("ours_fwd", lambda: ours(x, wt)))}
    return dict(shape=[b, c, h, w], K=k, dilation=d, **ms,
                speedup_nchw=ms["aten_nchw"] / ms["ours"], speedup_cl=ms["aten_cl"] / ms["ours_cl"],
                speedup=min(ms["aten_nchw"], ms["aten_cl"]) / min(ms["ours"], ms["ours_cl"]),
                bwd_ratio=ms["ours"] / ms["ours_fwd"])


def shapes_of_run(output_dir) -> list[tuple]:
    """Every distinct ``(B, C, H, W, K, d)`` depthwise conv of a run's model (train form, random weights: only
    the shapes matter) on one batch of each modality at the run's batch size, in the order the model runs them."""
    from uniperc import runs
    from uniperc.multimodal import MultiModalNet

    spec, cfg = runs.read_model_spec(output_dir), runs.read_config(output_dir)
    if cfg is None:
        raise ValueError(f"run folder {str(output_dir)!r} has no {runs.CONFIG_FILE}")
    model = MultiModalNet(spec["backbone"], spec["tasks"], spec["backbone_kwargs"]).train()
    with torch.no_grad(), dw.recording_calls() as calls:
        for name, task in spec["tasks"].items():
            batch = cfg["modalities"][name]["batch_size"]
            model(torch.zeros(batch, task["in_chans"], *task["input_size"]), name)
    return list(dict.fromkeys(calls))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uniperc.bench dwconv_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxCxHxWxK[xD],...")
    p.add_argument("--run", metavar="OUTPUT_DIR", help="time the shapes of this training run's model instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        shapes = shapes_of_run(args.run) if args.run else [_shape(s) for s in args.shapes.split(",") if s]
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    old = dw.get_backend()
    dw.set_backend("torch")
    print(f"cpu, {args.threads} thread(s), fp32, fwd+bwd, median of {args.repeats} (ms); speed-ups of the op over "
          "aten on NCHW / channels_last inputs and best layout over best layout")
    head = (f"{'B x C x H x W':16} {'K':>3} {'d':>2} {'aten NCHW':>10} {'aten CL':>9} {'op NCHW':>8} {'op CL':>8} "
            f"{'x NCHW':>7} {'x CL':>7} {'x best':>7} {'op fwd':>8} {'fwdbwd/fwd':>10}")
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    try:
        for s in shapes:
            r = measure(*s, args.repeats)
            rows.append(r)
            print(f"{'x'.join(map(str, r['shape'])):16} {r['K']:>3} {r['dilation']:>2} {r['aten_nchw']:10.1f} "
                  f"{r['aten_cl']:9.1f} {r['ours']:8.1f} {r['ours_cl']:8.1f} {r['speedup_nchw']:6.2f}x "
                  f"{r['speedup_cl']:6.2f}x {r['speedup']:6.2f}x {r['ours_fwd']:8.1f} {r['bwd_ratio']:10.2f}",
                  flush=True)
    finally:
        dw.set_backend(old)
    return rows


if __name__ == "__main__":
    main()
