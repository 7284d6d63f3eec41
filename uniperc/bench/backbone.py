"""Backbone throughput: train step, train-form eval and deploy-form (reparameterised) eval, in images/s.

``python -m uniperc.bench backbone --model unireplknet_a --batch 32 --size 128``; timm's ``convnext_atto``
is measured in the same run as a reference point.
"""
from __future__ import annotations

import argparse

import timm
import torch

import uniperc
from ._timing import median_seconds, train_images_per_second


def measure(name: str, batch: int, size: int, repeats: int, device: str, in_chans: int = 3) -> dict[str, float]:
    """images/s for a train step (fwd+bwd+AdamW), eval forward, and eval forward after reparameterisation."""
    model = timm.create_model(name, num_classes=1000, in_chans=in_chans).to(device)
    x = torch.randn(batch, in_chans, size, size, device=device)
    results = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
               "train": train_images_per_second(model, x, repeats, device)}
    model.eval()
    with torch.inference_mode():
        results["eval"] = batch / median_seconds(lambda: model(x), repeats, device=device)
        uniperc.reparameterize(model)
        results["deploy"] = batch / median_seconds(lambda: model(x), repeats, device=device)
    results["deploy_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m uniperc.bench backbone", description=__doc__)
    parser.add_argument("--model", default="unireplknet_a")
    parser.add_argument("--reference", default="convnext_atto", help="timm model measured alongside")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = {name: measure(name, args.batch, args.size, args.repeats, args.device)
            for name in (args.model, args.reference)}
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} size={args.size}")
    print(f"{'model':<18}{'params(M)':>10}{'train img/s':>13}{'eval img/s':>12}{'deploy img/s':>14}{'deploy/eval':>13}")
    for name, r in rows.items():
        print(f"{name:<18}{r['params_M']:>10.2f}{r['train']:>13.1f}{r['eval']:>12.1f}{r['deploy']:>14.1f}"
              f"{r['deploy'] / r['eval']:>12.2f}x")
    ours, ref = rows[args.model], rows[args.reference]
    print(f"{args.model} / {args.reference}: train {ours['train'] / ref['train']:.2f}x, "
          f"eval {ours['eval'] / ref['eval']:.2f}x, deploy {ours['deploy'] / ref['deploy']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
