"""Trivial baselines on hand-made data whose numbers are known in closed form."""
import datasets
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import uniperc.modalities as modalities
from uniperc.baselines import compute, describe
from uniperc.data import TaskData

m = modalities.get("weather")


def _task(dsd, task="regression", num_outputs=None):
    cfg = m.fitted_config(dsd)
    return TaskData(name="weather", task=task, in_chans=m.in_chans(cfg), input_size=m.input_size(cfg),
                    num_outputs=num_outputs or m.num_outputs(dsd), output_names=m.label_names(dsd),
                    adapter_config=cfg, splits=dict(dsd))


def test_persistence_and_climatology_of_a_linear_trend():
    # "a" = t everywhere (a steady trend), "b" = a fixed spatial pattern (never changes); 20 hourly steps,
    # history 2, horizon 1, splits 14 / 3 / 3 steps. Train inputs are the windows (t-1, t), t = 1..12: the
    # values 0..12 with 1..11 twice, so a's mean is 6 and its variance 1156/24 - 36 = 73/6.
    n_t = 20
    pattern = np.arange(6, dtype=np.float32).reshape(2, 3)
    ds = xr.Dataset({"a": (("time", "lat", "lon"), np.broadcast_to(np.arange(n_t, dtype=np.float32)[:, None, None],
                                                                  (n_t, 2, 3)).copy()),
                     "b": (("time", "lat", "lon"), np.broadcast_to(pattern, (n_t, 2, 3)).copy())},
                    coords={"time": pd.date_range("2020-01-01", periods=n_t, freq="h"), "lat": [0.0, 1.0],
                            "lon": [0.0, 1.0, 2.0]})
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1})
    assert m.fitted_config(dsd)["stats"]["vars"]["a"] == pytest.approx([6.0, np.sqrt(73 / 6)])
    out = compute(_task(dsd), ["validation", "test"])
    var_a = 73 / 6
    for split, target in (("validation", 16), ("test", 19)):  # each of these splits holds one window
        pers, clim = out[split]["persistence"], out[split]["climatology"]
        assert pers["mse/a"] == pytest.approx(1 / var_a, rel=1e-5)  # off by one hour, in units of a's std
        assert clim["mse/a"] == pytest.approx((target - 7.5) ** 2 / var_a, rel=1e-5)  # train targets 2..13: mean 7.5
        assert pers["mse/b"] == pytest.approx(0, abs=1e-10) and clim["mse/b"] == pytest.approx(0, abs=1e-10)
        assert pers["mse"] == pytest.approx(pers["mse/a"] / 2) and pers["rmse"] == pytest.approx(pers["mse"] ** 0.5)
    text = describe("weather", "test", dict(out["test"]["persistence"]), out["test"], "regression")
    assert "persistence 0.0411 " in text and "climatology" in text and "a:" in text.replace(" ", "")


def test_masked_targets_are_left_out_of_the_baselines():
    n_t = 20
    a = np.broadcast_to(np.arange(n_t, dtype=np.float32)[:, None, None], (n_t, 2, 3)).copy()
    a[:, 0, 0] = np.nan  # one grid cell is never observed
    a[16, 1, 2] = 1e4  # ... and one validation target is absurd, but finite: it must count
    ds = xr.Dataset({"a": (("time", "lat", "lon"), a)},
                    coords={"time": pd.date_range("2020-01-01", periods=n_t, freq="h"), "lat": [0.0, 1.0],
                            "lon": [0.0, 1.0, 2.0]})
    dsd = m.from_xarray(ds, {"history": 2, "horizon": 1, "nan_policy": "mask"})
    std = m.fitted_config(dsd)["stats"]["vars"]["a"][1]
    out = compute(_task(dsd), ["validation", "test"])
    assert out["test"]["persistence"]["mse"] == pytest.approx(1 / std ** 2, rel=1e-5)  # the 5 observed cells only
    assert out["validation"]["persistence"]["mse"] == pytest.approx((4 * 1 + (1e4 - 15) ** 2) / 5 / std ** 2, rel=1e-4)


def test_chance_and_majority_class():
    rows = {"train": [0, 0, 0, 1, 2, 2], "validation": [1, 1, 2, 0], "test": [0, 2]}
    feats = datasets.Features({"label": datasets.ClassLabel(names=["x", "y", "z"])})
    splits = {s: datasets.Dataset.from_dict({"label": v}, features=feats) for s, v in rows.items()}
    data = TaskData(name="image", task="classification", in_chans=3, input_size=(8, 8), num_outputs=3,
                    output_names=["x", "y", "z"], adapter_config={}, splits=splits)
    out = compute(data, ["validation", "test"])
    assert out["validation"]["chance"]["top1"] == pytest.approx(100 / 3)
    assert out["validation"]["majority"]["top1"] == pytest.approx(25.0)  # class 0 (train's most frequent): 1 of 4
    assert out["test"]["majority"]["top1"] == pytest.approx(50.0)
    text = describe("image", "test", {"top1": 90.0}, out["test"], "classification")
    assert text == "test image top-1: model 90.00% | chance 33.33% | majority 50.00%"
