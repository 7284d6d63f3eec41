"""Inference forms of the variants on the CPU, in images/s: train form (eval mode, NCHW), deploy form NCHW, deploy form
in the layout :func:`uniperc.inference.prepare` picks, and (``--compile``) that form under ``torch.compile``, with its
compile time.

``python -m uniperc.bench inference --models unireplknet_a,uniconvnet_a,pelk_t,van_b0 --batch 8 --size 128``
The forms take turns in every round (:func:`~uniperc.bench._timing.interleaved_median_seconds`); each is checked
against the train form's outputs (largest relative error printed).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from uniperc.inference import prepare
from ._timing import interleaved_median_seconds


def measure(name: str, batch: int, size: int, rounds: int, compile: bool = False) -> dict[str, float]:
    """images/s per form (``train``, ``deploy_nchw``, ``fast``, ``compiled``), ``compile_s`` and ``max_rel_err``."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    x = torch.randn(batch, 3, size, size)
    forms = {"train": model, "deploy_nchw": prepare(model, layout="nchw", compile=False),
             "fast": prepare(model, compile=False)}
    results = {}
    with torch.inference_mode():
        ref = model(x)
        if compile:
            forms["compiled"] = prepare(model, compile=True)
            start = time.perf_counter()
            forms["compiled"](x)
            results["compile_s"] = time.perf_counter() - start
        results["max_rel_err"] = max(float((f(x) - ref).abs().max() / ref.abs().max()) for f in forms.values())
        seconds = interleaved_median_seconds({k: (lambda f=f: f(x)) for k, f in forms.items()}, rounds)
    return {**{k: batch / s for k, s in seconds.items()}, **results}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m uniperc.bench inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unireplknet_a,uniconvnet_a,pelk_t,van_b0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes per model on a CPU)")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in timm.list_models():
            raise ValueError(f"--models: {name!r} is not a registered timm model")
    print(f"cpu threads={torch.get_num_threads()} batch={args.batch} size={args.size} rounds={args.rounds}")
    head = f"{'model':<15}{'train NCHW':>11}{'deploy NCHW':>12}{'deploy fast':>12}"
    print(head + (f"{'compiled':>10}{'compile s':>10}" if args.compile else "") + f"{'fast/train':>11}{'max rel err':>12}")
    rows = {}
    for name in names:
        r = rows[name] = measure(name, args.batch, args.size, args.rounds, args.compile)
        line = f"{name:<15}{r['train']:>11.1f}{r['deploy_nchw']:>12.1f}{r['fast']:>12.1f}"
        if args.compile:
            line += f"{r['compiled']:>10.1f}{r['compile_s']:>10.0f}"
        print(line + f"{r['fast'] / r['train']:>10.2f}x{r['max_rel_err']:>12.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
