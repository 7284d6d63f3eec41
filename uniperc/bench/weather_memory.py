"""``python -m uniperc.bench weather_memory``: peak resident memory of weather training on a large zarr archive.

It writes a zarr store of ``--gib`` GiB (float32 fields ``variables x time x grid x grid``, chunked along time,
written a block at a time with ``to_zarr(append_dim="time")`` so that generation stays small too), then, in a
fresh subprocess, loads it with ``uniperc.modalities.weather`` (the streaming statistics and finiteness passes
included) and runs ``--steps`` training steps of a tiny dense-head model, and prints that subprocess's peak
resident set size (``VmHWM``). The weather rows hold window indices, not fields, so the peak does not grow with
the archive: compare two sizes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "kernel_sizes": [3, 5, 5, 5]}


def write_store(path, gib: float, grid: int = 64, variables: int = 2, chunk: int = 32, seed: int = 0) -> Path:
    """A zarr store of about ``gib`` GiB: smooth travelling waves plus noise, hourly, chunked ``chunk`` steps."""
    import pandas as pd
    import xarray as xr

    path = Path(path)
    steps = int(gib * 2**30 / (4 * variables * grid * grid))
    rng = np.random.default_rng(seed)
    lat = np.linspace(-90 + 90 / grid, 90 - 90 / grid, grid)
    lon = np.arange(grid) * 360.0 / grid
    phase = np.radians(lon)[None, :] + np.radians(lat)[:, None] * 2
    block = max(chunk, (64 << 20) // (4 * variables * grid * grid) // chunk * chunk)  # ~64 MiB per write
    names = [f"v{i}" for i in range(variables)]
    for a in range(0, steps, block):
        n = min(block, steps - a)
        t = np.arange(a, a + n, dtype=np.float32)[:, None, None]
        data = {v: (("time", "lat", "lon"), (np.sin(phase[None] - 0.1 * (i + 1) * t)
                                             + 0.1 * rng.standard_normal((n, grid, grid))).astype(np.float32))
                for i, v in enumerate(names)}
        ds = xr.Dataset(data, coords={"time": pd.date_range("1980-01-01", periods=n, freq="h") + pd.Timedelta(hours=a),
                                      "lat": lat, "lon": lon})
        if a == 0:
            ds.to_zarr(path, mode="w", encoding={v: {"chunks": (chunk, grid, grid), "compressors": None} for v in names},
                       consolidated=True)
        else:
            ds.to_zarr(path, append_dim="time", consolidated=True)
    return path


def train_steps(store, steps: int = 3, batch_size: int = 8, history: int = 2, workers: int = 0) -> dict:
    """Load ``store`` and run ``steps`` AdamW steps of a tiny model; timings and this process's peak RSS."""
    import torch

    from uniperc.data import load_task, make_loader
    from uniperc.multimodal import MultiModalNet

    torch.set_num_threads(1)
    after_imports = peak_rss_mib()
    t0 = time.perf_counter()
    data = load_task("weather", "folder", {"history": history, "horizon": 1}, path=store)
    t_load = time.perf_counter() - t0
    spec = {"task": data.task, "in_chans": data.in_chans, "num_outputs": data.num_outputs,
            "output_names": data.output_names, "input_size": list(data.input_size), "head": data.head,
            "target_shape": list(data.target_shape), "residual_channels": data.residual_channels}
    model = MultiModalNet("unireplknet_a", {"weather": spec}, TINY)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    loader = make_loader(data.splits["train"], batch_size, True, 0, workers)
    losses = []
    for i, batch in enumerate(loader):
        if i == steps:
            break
        y = batch["labels"]
        valid = torch.isfinite(y)
        loss = ((model(batch["inputs"], "weather") - y.nan_to_num(0.0))[valid] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"train_windows": len(data.splits["train"]), "load_s": round(t_load, 2),
            "total_s": round(time.perf_counter() - t0, 2), "losses": losses, "peak_rss_mib": round(peak_rss_mib(), 1),
            "after_imports_rss_mib": round(after_imports, 1)}


def peak_rss_mib() -> float:
    """This process's peak resident set size (``VmHWM``: shared-library pages included; ``import torch`` alone
    is ~0.5 GiB of it here), MiB."""
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(store, steps: int = 3, batch_size: int = 8, workers: int = 0) -> dict:
    """:func:`train_steps` in a fresh interpreter, so that its peak RSS is the pipeline's alone."""
    code = ("import json, sys; from uniperc.bench.weather_memory import train_steps; "
            f"print(json.dumps(train_steps(sys.argv[1], {steps}, {batch_size}, workers={workers})))")
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"the training subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_gib(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**30


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uniperc.bench weather_memory", description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0], help="store sizes to compare")
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32, help="time steps per zarr chunk")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for gib in args.gib:
            store = Path(tmp) / f"weather_{gib}gib.zarr"
            t0 = time.perf_counter()
            write_store(store, gib, grid=args.grid, chunk=args.chunk)
            row = {"store_gib": round(store_gib(store), 3), "write_s": round(time.perf_counter() - t0, 1),
                   **measure(store, args.steps, args.batch_size, args.workers)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            import shutil

            shutil.rmtree(store)
    return rows


if __name__ == "__main__":
    main()
