"""Weather modality: xarray -> windows, train-only statistics, station grids, netCDF/zarr, bad data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import uniperc.modalities as modalities
from uniperc.modalities.base import ExampleTransform
from uniperc.modalities.weather import StationEmbedding, open_xarray, simulate_fields

m = modalities.get("weather")
DEMO = {"days": 4, "nlat": 8, "nlon": 16}


def gridded(n_t=40, vars_=("a", "b"), seed=0):
    rng = np.random.default_rng(seed)
    data = {v: (("time", "lat", "lon"), rng.normal(10 * i, 1 + i, (n_t, 4, 6)).astype(np.float32) + np.arange(n_t)[:, None, None])
            for i, v in enumerate(vars_)}
    return xr.Dataset(data, coords={"time": pd.date_range("2020-01-01", periods=n_t, freq="h"),
                                    "lat": np.linspace(-60, 60, 4), "lon": np.arange(6) * 60.0})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("weather")
    return m.load("demo", cfg={"history": 3, "horizon": 2}, cache_dir=cache, **DEMO), cache


def test_demo_written_as_netcdf_and_read_back(demo):
    dsd, cache = demo
    files = sorted(cache.rglob("*.nc"))
    assert {f.parent.name for f in files} == {"t2m", "q"}
    ds = open_xarray(files[0].parents[1])
    assert set(ds.data_vars) == {"t2m", "q"} and ds.sizes["time"] == 96 and ds["t2m"].dims == ("time", "lat", "lon")
    cfg = m.fitted_config(dsd)
    assert m.in_chans(cfg) == 2 * 3 and m.input_size(cfg) == (8, 16)
    s = dsd["train"][0]
    assert s["inputs"].shape == (6, 8, 16) and s["labels"].shape == (m.num_outputs(dsd),)
    assert m.num_outputs(dsd) == 2 * 2 * 8 * 16 and m.target_shape(dsd) == (4, 8, 16)
    assert m.label_names(dsd) == cfg["target_variables"] == ["q", "t2m"]


def test_demo_fields_have_physical_structure():
    t2m, q = simulate_fields(72, 16, 32, seed=0)
    assert np.isfinite(t2m).all() and np.isfinite(q).all() and (q > 0).all()
    eq = t2m[:, 7:9].mean(1)  # equatorial band, (time, lon)
    by_local_hour = np.zeros(24)
    for n in range(24, 72):  # after a day of spin-up
        for j in range(32):
            by_local_hour[int(n % 24 + j * 24 / 32) % 24] += eq[n, j] / 48
    # the diurnal cycle follows local solar time, warmest in the afternoon (heating peaks at noon)
    assert by_local_hour.max() - by_local_hour.min() > 2.0 and 12 <= int(by_local_hour.argmax()) <= 20
    assert t2m[:, 8].mean() > t2m[:, 0].mean() + 20  # warm tropics, cold poles
    # advection: without the (westward-moving) day-night wave, the anomalies at t+1 match the field at t
    # shifted one cell east (the jet's speed) better than the unshifted field
    t2m, _ = simulate_fields(40, 16, 32, seed=0, diurnal=0.0)
    anom = t2m[30] - t2m[30].mean(1, keepdims=True)
    nxt = t2m[31] - t2m[31].mean(1, keepdims=True)
    band = slice(6, 10)
    err_still = np.abs(nxt[band] - anom[band]).mean()
    err_east = np.abs(nxt[band] - np.roll(anom[band], 1, axis=1)).mean()
    assert err_east < err_still


def test_statistics_come_from_the_train_split_only():
    ds = gridded(n_t=100)
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1})
    stats = m.fitted_config(dsd)["stats"]["vars"]
    # split_fractions 0.7 / 0.15 / 0.15: train windows use inputs at steps 0..68 (step 69 is only a target)
    train_inputs = ds.isel(time=slice(0, 69))
    assert stats["a"][0] == pytest.approx(float(train_inputs["a"].mean()), abs=0.05)
    assert abs(stats["a"][0] - float(ds["a"].mean())) > 10  # the trend makes later blocks warmer
    # a test target is never inside a training window
    times = {k: set(v.with_format(None)["time"]) for k, v in dsd.items()}
    last_train = max(pd.Timestamp(t) for t in times["train"])
    assert min(pd.Timestamp(t) for t in times["test"]) > last_train + pd.Timedelta(hours=2)


def test_lon_roll_moves_inputs_and_target_together():
    ds = gridded(n_t=30)
    dsd = m.from_xarray(ds, {"history": 1, "horizon": 1, "lon_roll": True})
    ref = dsd["validation"][0]
    train_view = dsd["validation"].with_transform(ExampleTransform("weather", m.fitted_config(dsd), train=True))
    torch.manual_seed(0)
    rolled = train_view[0]
    shifts = [s for s in range(6) if torch.allclose(torch.roll(ref["inputs"], s, -1), rolled["inputs"])]
    assert len(shifts) == 1
    y_ref, y_rot = ref["labels"].view(2, 4, 6), rolled["labels"].view(2, 4, 6)
    assert torch.allclose(torch.roll(y_ref, shifts[0], -1), y_rot)


def test_station_data_becomes_a_square_grid():
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"temp": (("time", "station"), rng.normal(size=(30, 10)).astype(np.float32)),
                     "wind": (("time", "station"), rng.normal(size=(30, 10)).astype(np.float32))},
                    coords={"time": pd.date_range("2021-01-01", periods=30, freq="h")})
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1})
    x = dsd["train"][0]["inputs"]
    assert x.shape == (4, 4, 4) and m.num_outputs(dsd) == 2 * 10
    assert torch.equal(x[:, 2, 2:], torch.zeros(4, 2))  # 10 stations fill 10 of the 16 cells
    raw = ds["temp"].values[:2]  # the first train window's inputs: steps 0, 1 of every station
    assert np.isclose(float(x[0, 1, 0]), (raw[0, 4] - m.fitted_config(dsd)["stats"]["vars"]["temp"][0])
                      / m.fitted_config(dsd)["stats"]["vars"]["temp"][1], atol=1e-5)  # station 4 -> cell (1, 0)
    emb = StationEmbedding(in_chans=4, embed_dim=8, num_stations=10)
    out = emb(x[None])
    assert out.shape == (1, 8, 4, 4) and out[0, :, 3, 3].abs().sum() == 0 and out[0, :, 0, 0].abs().sum() > 0


def test_label_mode_is_classification():
    ds = gridded(n_t=60)
    ds["regime"] = ("time", np.where(np.arange(60) % 4 < 2, "dry", "wet"))
    dsd = m.from_xarray(ds, {"variables": ["a"], "label_variable": "regime", "history": 2, "horizon": 0})
    assert m.label_names(dsd) == ["dry", "wet"] and m.num_outputs(dsd) == 2
    assert m.task_for({"label_variable": "regime"}) == "classification"
    assert dsd["test"][0]["labels"].dtype == torch.long


def test_bad_datasets_raise(tmp_path):
    ds = gridded()
    with pytest.raises(ValueError, match="no time dimension"):
        m.from_xarray(ds.rename(time="step"))
    with pytest.raises(ValueError, match="lat/lon"):
        m.from_xarray(ds.rename(lat="row"))
    bad = ds.copy(deep=True)
    bad["b"][5, 1, 1] = np.nan
    with pytest.raises(ValueError, match="'b'.*non-finite.*2020-01-01T05"):
        m.from_xarray(bad)
    with pytest.raises(ValueError, match="too few"):
        m.from_xarray(ds.isel(time=slice(0, 4)), {"history": 4})
    with pytest.raises(ValueError, match="not found"):
        m.from_xarray(ds, {"variables": ["z500"]})


def test_zarr_folder_and_read_file(tmp_path):
    ds = gridded(n_t=40)
    ds.to_zarr(tmp_path / "store.zarr")
    dsd = m.load("folder", path=tmp_path / "store.zarr", cfg={"history": 2})
    cfg = m.fitted_config(dsd)
    assert set(cfg["variables"]) == {"a", "b"}
    ds.isel(time=slice(-3, None)).to_netcdf(tmp_path / "latest.nc")
    x = m.read_file(tmp_path / "latest.nc", cfg)
    assert x.shape == (4, 4, 6)
    with pytest.raises(ValueError, match="normalisation stats"):
        m.read_file(tmp_path / "latest.nc", {"history": 2, "variables": ["a", "b"]})
    pred = dsd["test"][0]["labels"]
    phys = m.denormalize(pred, cfg).view(2, 4, 6)
    stats = cfg["stats"]["vars"]
    assert torch.allclose(phys[0], pred.view(2, 4, 6)[0] * stats["a"][1] + stats["a"][0])


def test_hub_source_needs_an_explicit_file():
    with pytest.raises(ValueError, match="hub_path"):
        m.load("hub")
    with pytest.raises(ValueError, match="hf://datasets"):
        m.hub_spec()
    with pytest.raises(ValueError, match="must look like"):
        m.load("hub", hub_path="hf://datasets/only-owner")


def test_persistence_is_each_target_variables_newest_input_step():
    ds = gridded(n_t=40)
    cfg_in = {"history": 3, "horizon": 2, "target_variables": ["b"]}
    dsd = m.from_xarray(ds, cfg_in)
    cfg = m.fitted_config(dsd)
    assert m.persistence_channels(cfg) == [1 * 3 + 2] * 2  # variable b (index 1), step 3 of 3, for both lead steps
    assert m.field_shape(cfg) == (2, 4, 6)
    batch = torch.stack([dsd["test"][i]["inputs"] for i in range(2)])
    starts = dsd["test"].with_format(None)[:2]["start"]
    b_mean, b_std = cfg["stats"]["vars"]["b"]
    newest_b = (ds["b"].values[[s + 2 for s in starts]] - b_mean) / b_std  # physical units -> normalised
    expected = np.stack([newest_b, newest_b], 1).reshape(2, -1)
    np.testing.assert_allclose(m.last_step(batch, cfg).numpy(), expected, rtol=1e-5, atol=1e-5)
    label = m.fitted_config(m.from_xarray(ds.assign(regime=("time", np.arange(40) % 2)),
                                          {"variables": ["a"], "label_variable": "regime", "horizon": 0}))
    assert m.field_shape(label) is None and m.persistence_channels(label) is None and m.last_step(batch, label) is None


def test_station_forecasts_are_not_fields_but_have_persistence():
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"temp": (("time", "station"), rng.normal(size=(30, 5)).astype(np.float32))},
                    coords={"time": pd.date_range("2021-01-01", periods=30, freq="h")})
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1})
    cfg = m.fitted_config(dsd)
    assert m.field_shape(cfg) is None  # a pooled head predicts station rows
    s = dsd["test"][0]
    x_newest = s["inputs"][1].flatten()[:5]  # channel (temp, step 2) on the 3 x 3 grid, first 5 cells
    assert torch.equal(m.last_step(s["inputs"][None], cfg)[0], x_newest)


def masked_grid(n_t=40):
    """Two variables; "b" is NaN over a 'land' block at every step, "a" misses one value at step 20."""
    ds = gridded(n_t=n_t)
    ds["b"][:, :2, :3] = np.nan
    ds["a"][20, 3, 5] = np.nan
    return ds


def test_nan_policy_raise_names_the_setting():
    with pytest.raises(ValueError, match="'a'.*non-finite.*nan_policy='mask'"):
        m.from_xarray(masked_grid())
    with pytest.raises(ValueError, match="nan_policy"):
        m.config({"nan_policy": "drop"})


def test_nan_policy_mask_fills_inputs_adds_a_mask_channel_and_keeps_targets_masked():
    ds = masked_grid()
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1, "nan_policy": "mask"})
    cfg = m.fitted_config(dsd)
    assert m.in_chans(cfg) == 2 * 2 + 1
    # statistics ignore the masked values: b's mean over the train inputs' valid cells only
    train_b = ds["b"].isel(time=slice(0, 27)).values  # train block 0..27, inputs at steps 0..26
    assert cfg["stats"]["vars"]["b"][0] == pytest.approx(float(np.nanmean(train_b)), abs=0.05)
    s = dsd["train"][0]
    x, y = s["inputs"], s["labels"].view(2, 4, 6)
    assert x.shape == (5, 4, 6) and torch.isfinite(x).all()
    assert torch.equal(x[4, :2, :3], torch.zeros(2, 3)) and x[4, 2:].eq(1).all()  # the mask channel
    assert torch.equal(x[2:4, :2, :3], torch.zeros(2, 2, 3))  # b's masked inputs are 0 (its mean) after filling
    assert torch.isnan(y[1, :2, :3]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, 2:]).all()
    # the window whose input holds a's missing step 20 masks only that cell
    row = next(i for i in range(len(dsd["train"])) if dsd["train"].with_format(None)[i]["time"].startswith("2020-01-01T20"))
    mask = dsd["train"][row]["inputs"][4]
    assert mask[3, 5] == 0 and mask.sum() == 24 - 6 - 1
    # the regression loss ignores the masked targets: a prediction equal to the target elsewhere and absurd on
    # the masked points has zero loss (it would be ~1e12, or NaN, if they counted)
    from uniperc.heads import TaskHead

    pred = s["labels"].nan_to_num(1e6)[None]
    assert TaskHead(4, 48, "regression", output_names=cfg["target_variables"]).loss(pred, s["labels"][None]).item() == 0.0


def test_a_file_that_is_not_netcdf_is_named(tmp_path):
    ds = gridded(n_t=40)
    (tmp_path / "a").mkdir()
    ds[["a"]].to_netcdf(tmp_path / "a" / "a_01.nc")
    bad = tmp_path / "a" / "notes.nc"
    bad.write_text("this is a text file, not netCDF\n")
    with pytest.raises(ValueError, match=f"{bad}.*netCDF or zarr"):
        m.load("folder", path=tmp_path, cfg={"history": 2})
    with pytest.raises(ValueError, match=f"{bad}"):
        open_xarray(bad)
