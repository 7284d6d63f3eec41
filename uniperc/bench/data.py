"""``python -m uniperc.bench data``: is the data side fast enough to keep the backbone busy?

For each modality it builds a small demo set, then measures

* **loader**: samples/s of ``DataLoader(train split, batch_size, num_workers=W)`` — decoding, the
  adapter and train-time augmentation included (the first batch, i.e. worker start-up, is not timed);
* **train step**: samples/s of one forward + backward (the modality's task loss) + AdamW step of
  ``timm.create_model(model, in_chans=C', num_classes=N)`` on a batch of that modality's shape.

The data side is not the bottleneck when ``loader / train >= 1`` (printed as ``headroom``). Both are
measured separately on the same machine; in real training they share its cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

DEMO_SIZES = {  # enough train rows for a few batches, generated in seconds
    "image": {"n_per_class": 40},
    "audio": {"n_per_class": 40},
    "point_cloud": {"n_per_class": 30},
    "weather": {"days": 30},
    "video": {"n_per_class": 25},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m uniperc.bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--modalities", default="image,audio,point_cloud,weather,video")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="timed loader batches (after one warm-up batch)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up step)")
    p.add_argument("--model", default="unireplknet_a")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the train step (default: torch's)")
    p.add_argument("--cache-dir", default=None, help="where demo sets go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def loader_rate(ds, batch_size: int, batches: int, workers: int) -> float:
    """Samples/s over ``batches`` batches, after the first (worker start-up) batch."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=False, persistent_workers=False)
    n, it = 0, iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["labels"])
    return n / (time.perf_counter() - t0)


def train_step_rate(model_name: str, batch: dict, num_outputs: int, task: str, steps: int) -> float:
    """Samples/s of forward + backward + optimiser step on ``batch`` (median step time)."""
    import timm

    import uniperc  # noqa: F401  (registers the UniPercNet variants in timm)
    from uniperc.tasks import get_task

    x, y = batch["inputs"], batch["labels"]
    model = timm.create_model(model_name, in_chans=x.shape[1], num_classes=num_outputs)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = get_task(task).loss
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step pays one-off allocation / kernel selection costs
            times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def bench_modality(name: str, args, cache_dir: str) -> dict:
    import uniperc.modalities as modalities

    m = modalities.get(name)
    cfg = m.demo_config() if hasattr(m, "demo_config") else m.default_config()
    t0 = time.perf_counter()
    dsd = m.load("demo", cfg=cfg, cache_dir=cache_dir, seed=0, **DEMO_SIZES.get(name, {}))
    build_s = time.perf_counter() - t0
    fitted = m.fitted_config(dsd)
    train = dsd["train"]
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=False)))
    task = m.task_for(fitted)
    row = {
        "modality": name,
        "input": [int(m.in_chans(fitted)), *map(int, m.input_size(fitted))],
        "outputs": int(m.num_outputs(dsd)),
        "train_rows": len(train),
        "demo_build_s": round(build_s, 1),
        "loader_1proc_sps": round(loader_rate(train, args.batch_size, max(2, args.batches // 2), 0), 1),
        f"loader_{args.workers}w_sps": round(loader_rate(train, args.batch_size, args.batches, args.workers), 1),
        "train_step_sps": round(train_step_rate(args.model, batch, m.num_outputs(dsd), task, args.steps), 1),
    }
    row["headroom"] = round(row[f"loader_{args.workers}w_sps"] / row["train_step_sps"], 2)
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.modalities.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        for name in names:
            rows.append(bench_modality(name, args, cache))
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print(f"\nbatch {args.batch_size}, model {args.model}, torch threads {torch.get_num_threads()}, "
          f"{args.workers} DataLoader workers (samples/s):")
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
