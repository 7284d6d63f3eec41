"""Weather rows are window indices into a lazily opened archive: same samples as stacking the windows, and a
resident memory that does not grow with the archive."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import uniperc.modalities as modalities
from uniperc.data import make_loader
from uniperc.modalities.weather import open_xarray

m = modalities.get("weather")
DEMO = {"days": 4, "nlat": 8, "nlon": 16}


def stacked_windows(ds, variables, hist, hor, fractions=(0.7, 0.15, 0.15)):
    """What the eager loader stored, in plain numpy: every window's fields, chronological blocks, and the
    per-variable mean / std over the train split's stacked input windows."""
    fields = np.stack([ds[v].transpose("time", "lat", "lon").values.astype(np.float32) for v in variables])
    n_t = fields.shape[1]
    bounds = np.cumsum([0] + [round(f * n_t) for f in fractions[:2]] + [n_t])
    bounds[-1] = n_t
    splits = {}
    for split, lo, hi in zip(("train", "validation", "test"), bounds[:-1], bounds[1:]):
        ts = range(lo + hist - 1, hi - hor)
        splits[split] = (np.stack([fields[:, t - hist + 1 : t + 1] for t in ts]),
                         np.stack([fields[:, t + 1 : t + 1 + hor] for t in ts]),
                         [str(ds["time"].values[t]) for t in ts])
    x = splits["train"][0].astype(np.float64).transpose(1, 0, 2, 3, 4).reshape(len(variables), -1)
    return splits, x.mean(1), x.std(1)


def test_lazy_rows_give_the_stacked_windows_of_the_demo(tmp_path):
    hist, hor = 3, 2
    dsd = m.load("demo", cfg={"history": hist, "horizon": hor}, cache_dir=tmp_path, **DEMO)
    cfg = m.fitted_config(dsd)
    assert dsd["train"].column_names == ["source", "start", "time"]  # no field in the table
    files = sorted(tmp_path.rglob("*.nc"))
    with xr.open_mfdataset(files, combine="by_coords") as ref:
        splits, mean, std = stacked_windows(ref.load(), cfg["variables"], hist, hor)
    got = cfg["stats"]["vars"]
    np.testing.assert_allclose([got[v][0] for v in cfg["variables"]], mean, rtol=1e-9)
    np.testing.assert_allclose([got[v][1] for v in cfg["variables"]], std, rtol=1e-6)
    for split, (x, y, times) in splits.items():
        assert len(dsd[split]) == len(x) and dsd[split].with_format(None)["time"] == times
        xn = (x - mean[None, :, None, None, None]) / std[None, :, None, None, None]
        yn = (y - mean[None, :, None, None, None]) / std[None, :, None, None, None]
        for i in range(len(x)):
            s = dsd[split][i]
            np.testing.assert_allclose(s["inputs"].numpy(), xn[i].reshape(-1, 8, 16), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(s["labels"].numpy(), yn[i].reshape(-1), rtol=1e-5, atol=1e-5)


def test_a_folder_of_files_opens_lazily_and_workers_reopen_it(tmp_path):
    dsd = m.load("demo", cfg={"history": 2, "horizon": 1}, cache_dir=tmp_path, **DEMO)
    root = next(tmp_path.iterdir())
    ds = open_xarray(root)
    assert ds["t2m"].chunks is not None and not ds["t2m"].variable._in_memory  # dask-backed, nothing read yet
    one = [b["inputs"] for b in make_loader(dsd["validation"], 4, False, 0, 0)]
    two = [b["inputs"] for b in make_loader(dsd["validation"], 4, False, 0, 2)]  # each worker opens the files
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == len(two)


def test_small_archives_are_held_in_memory_and_large_ones_stay_lazy(tmp_path, monkeypatch):
    """Up to IN_MEMORY_BYTES an archive is read once per process (a window is then an array slice, not a dask
    graph per sample); above it, it stays on disk. The samples are the same either way."""
    from uniperc.modalities import weather

    dsd = m.load("demo", cfg={"history": 2, "horizon": 1}, cache_dir=tmp_path, **DEMO)
    key = dsd["validation"].with_format(None)[0]["source"]

    def samples_and_opened(limit):
        monkeypatch.setattr(weather, "IN_MEMORY_BYTES", limit)
        weather._SOURCES.pop(weather._slot(key), None)  # this process reopens the archive under `limit`
        samples = [dsd["validation"][i]["inputs"] for i in range(len(dsd["validation"]))]
        return samples, weather.source_dataset(key)

    eager, opened = samples_and_opened(weather.IN_MEMORY_BYTES)
    assert opened.nbytes < weather.IN_MEMORY_BYTES and all(v.variable._in_memory for v in opened.data_vars.values())
    lazy, opened = samples_and_opened(opened.nbytes - 1)
    assert not any(v.variable._in_memory for v in opened.data_vars.values())
    assert len(eager) == len(lazy) > 0 and all(torch.equal(a, b) for a, b in zip(eager, lazy))


def test_in_memory_datasets_are_read_by_forked_workers():
    import pandas as pd

    rng = np.random.default_rng(0)
    ds = xr.Dataset({"a": (("time", "lat", "lon"), rng.normal(size=(30, 4, 6)).astype(np.float32))},
                    coords={"time": pd.date_range("2020-01-01", periods=30, freq="h"), "lat": np.arange(4.0),
                            "lon": np.arange(6.0)})
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1})
    one = torch.cat([b["labels"] for b in make_loader(dsd["train"], 4, False, 0, 0)])
    two = torch.cat([b["labels"] for b in make_loader(dsd["train"], 4, False, 0, 1)])
    assert torch.equal(one, two)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_store(tmp_path):
    """A 0.04 GiB and a 2 GiB zarr store (issue 13's size): the same peak RSS, under 1 GiB, for loading
    (streamed statistics and finiteness check included) plus three training steps, each in a fresh
    subprocess (about 1 min; ``python -m uniperc.bench weather_memory --gib 0.25 2`` prints the same figures)."""
    from uniperc.bench.weather_memory import measure, store_gib, write_store

    peaks = {}
    for gib in (0.04, 2.0):
        store = write_store(tmp_path / f"s{gib}.zarr", gib)
        assert store_gib(store) == pytest.approx(gib, rel=0.05)
        out = measure(store, steps=3, batch_size=8)
        assert len(out["losses"]) == 3 and all(np.isfinite(out["losses"]))
        peaks[gib] = out["peak_rss_mib"]
        import shutil

        shutil.rmtree(store)
    assert max(peaks.values()) < 1024, peaks
    assert peaks[2.0] - peaks[0.04] < 64, peaks  # 50x the data, (almost) no more memory


def test_streamed_climatology_equals_the_mean_of_the_samples(tmp_path):
    from uniperc.baselines import _nanmean_targets
    from uniperc.data import load_task

    data = load_task("weather", "demo", {"history": 3, "horizon": 2}, demo={**DEMO, "cache_dir": tmp_path})
    streamed = m.climatology(data.splits["train"], data.adapter_config)
    assert streamed.shape == (1, data.num_outputs)
    torch.testing.assert_close(streamed, _nanmean_targets(data), atol=1e-5, rtol=1e-5)
