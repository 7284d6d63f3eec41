"""Weather modality: any xarray Dataset of fields -> ``(variables x history) x H x W`` (C' = V * history).

Gridded data, dims ``(time, lat, lon)``: a sample at time ``t`` stacks the ``history`` steps
``t-history+1 .. t`` of every input variable as channels, ordered variable-major
(``einops`` ``"v t h w -> (v t) h w"``, channel ``v * history + k`` is variable ``v`` at step ``k``, oldest
first). ``image_size`` optionally resizes the input grid (bilinear); the target stays on the native grid.
Target (task ``"regression"``): the ``horizon`` steps ``t+1 .. t+horizon`` of ``target_variables``,
flattened variable-major to ``FloatTensor[V_t * horizon * H * W]`` (:meth:`WeatherModality.target_shape`
gives the unflattened shape). A gridded forecast declares its target a field (:meth:`~WeatherModality.field_shape`),
so training gives it uniperc's dense head, which predicts every grid point from multi-scale features, and
:meth:`~WeatherModality.persistence_channels` names the input channel of each variable's last step (the dense
head's residual; :meth:`~WeatherModality.last_step` is the persistence forecast). Station data keeps a pooled
head (UniRepLKNet's global temperature / wind task also predicts every station and step from a linear head).
With ``label_variable`` set, the task is classification instead: the label is that 1-D variable's value at
``t + horizon``.

Station data, dims ``(time, station)``: the stations' values become one row ``C' x 1 x S`` and the
adapter places station ``s`` at cell ``(s // side, s % side)`` of a ``side x side`` grid
(``side = ceil(sqrt(S))``, zero padding) — UniRepLKNet's reading of station series as an image. The
learned version (their linear embedding per station) is :class:`StationEmbedding`, a module applied to
that grid: the modality's stem for station data (``stem_for``; ``station_embedding`` in the trainer's
``modalities.weather.stem``), followed by the backbone's own stem.

Missing values (``nan_policy``): ``"raise"`` (default) refuses NaN / inf with a ``ValueError`` naming the variable
and time; ``"mask"`` accepts them (land / sea masks, NaN outside a region): the statistics ignore them, masked
inputs are set to 0 (the mean) after normalisation, one extra input channel (the last) is 1 where every input
value of the grid cell was finite and 0 elsewhere, and masked targets stay NaN, which uniperc's regression
loss and metrics leave out.

Normalisation: per-variable mean / std computed on the train split only (:meth:`Modality.fit_config`
stores them in the config as ``stats``); inputs *and* targets are standardised, and
:meth:`WeatherModality.denormalize` maps predictions back to physical units.
Splits are chronological blocks (``split_fractions``); windows crossing a block boundary belong to no
split, so no time step of a test target is ever seen in training.
Real-size archives: nothing is loaded whole. The archive is opened lazily (xarray; dask arrays when several
files are combined), a table row holds only a window's first time step (``start``) and the archive's key
(``source``: its path, so that each DataLoader worker reopens it), and the transform reads that window's
``history + horizon`` steps when the sample is drawn. The statistics (:meth:`~WeatherModality.fit_config`), the
climatology baseline and the ``"raise"`` finiteness check are streaming passes over blocks of time steps.
Training augmentation: a random zonal roll of input and target together when ``lon_roll`` (only for
global, longitude-periodic grids).

Sources: ``demo`` = a generated global 32 x 64 grid (5.625 deg, WeatherBench's coarse resolution) of
hourly temperature and humidity advected by a zonal jet with diffusion, a diurnal cycle following local
solar time and random warm/moist anomalies, written as WeatherBench-style netCDF files
(``root/<variable>/<variable>_<month>.nc``) and read back through xarray; ``folder`` = any tree of
``.nc`` files / ``.zarr`` stores (merged with ``xarray.combine_by_coords``); ``hub`` = an xarray-readable
file in a Hub dataset repo (``hub_path="hf://datasets/<repo>/<file>"``), downloaded with ``huggingface_hub``.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from .base import SOURCES, SPLITS, HubSpec, Modality, check_finite, select_splits

NAN_POLICIES = ("raise", "mask")

DIM_ALIASES = {
    "time": ("time", "valid_time", "datetime", "date", "t"),
    "lat": ("lat", "latitude", "y", "rlat"),
    "lon": ("lon", "longitude", "x", "rlon"),
    "station": ("station", "stations", "station_id", "site", "location"),
}


def find_dims(ds, what: str) -> dict[str, str]:
    """Map our dim roles to the Dataset's dim names; ``ValueError`` if time or space is missing."""
    dims = {role: next((d for d in aliases if d in ds.dims), None) for role, aliases in DIM_ALIASES.items()}
    if dims["time"] is None:
        raise ValueError(f"{what}: no time dimension (looked for {DIM_ALIASES['time']}); dims are {dict(ds.sizes)}")
    if dims["station"] is None and (dims["lat"] is None or dims["lon"] is None):
        raise ValueError(
            f"{what}: needs lat/lon dimensions (or a station dimension); looked for "
            f"{DIM_ALIASES['lat']} / {DIM_ALIASES['lon']} / {DIM_ALIASES['station']}, dims are {dict(ds.sizes)}"
        )
    return dims


class StationEmbedding(nn.Module):
    """Learned per-station embedding on the square station grid (UniRepLKNet's station input).

    Each station's ``in_chans`` values (variables x history) are mapped by one shared linear layer to
    ``embed_dim`` channels — a 1x1 conv on the ``side x side`` layout — and padding cells stay zero.
    """

    def __init__(self, in_chans: int, embed_dim: int, num_stations: int):
        super().__init__()
        side = math.ceil(math.sqrt(num_stations))
        mask = torch.zeros(side * side)
        mask[:num_stations] = 1
        self.register_buffer("mask", mask.view(1, 1, side, side), persistent=False)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.mask


class WeatherModality(Modality):
    name = "weather"
    task = "regression"
    file_extensions = (".nc", ".nc4", ".netcdf", ".zarr")
    stems = ("station_embedding",)  # modalities.weather.stem
    hub = HubSpec(
        name="",
        config=None,
        columns={},
        splits={},
        notes="no gridded benchmark of UniRepLKNet's weather task is published on the Hub; pass "
        "hub_path='hf://datasets/<repo>/<file.nc|store.zarr>' to read any xarray file from a Hub repo",
        extra={"dims": DIM_ALIASES},
    )

    def default_config(self) -> dict:
        return {
            "variables": None,  # None: every data variable with the time + space dims
            "target_variables": None,  # None: same as variables
            "label_variable": None,  # set: classification of this 1-D (time) variable
            "history": 4,
            "horizon": 1,
            "image_size": None,  # None: native grid; [H, W] resizes the input
            "lon_roll": False,
            "split_fractions": [0.7, 0.15, 0.15],
            "nan_policy": "raise",  # raise | mask (see the module docstring)
            "station_embed_dim": 32,  # channels of the StationEmbedding stem (station data, stem: station_embedding)
            "stats": None,  # filled from the train split by load()
        }

    def validate_config(self, cfg):
        if int(cfg["history"]) < 1:
            raise ValueError(f"weather: history must be >= 1, got {cfg['history']}")
        if int(cfg["horizon"]) < (0 if cfg["label_variable"] else 1):
            raise ValueError(f"weather: horizon must be >= 1 for forecasting, got {cfg['horizon']}")
        fr = cfg["split_fractions"]
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"weather: split_fractions must be 3 positive numbers summing to 1, got {fr}")
        if int(cfg["station_embed_dim"]) < 1:
            raise ValueError(f"weather: station_embed_dim must be >= 1, got {cfg['station_embed_dim']}")
        if cfg["nan_policy"] not in NAN_POLICIES:
            raise ValueError(f"weather: nan_policy must be one of {NAN_POLICIES}, got {cfg['nan_policy']!r}")

    def hub_spec(self, cfg=None):
        """Weather has no Hub benchmark to name (see ``hub.notes``): ``ValueError`` with the way to use one."""
        raise ValueError(f"weather: {self.hub.notes}")

    def task_for(self, cfg) -> str:
        return "classification" if self.config(cfg)["label_variable"] else "regression"

    def stem_for(self, cfg) -> str:
        """Station data (known once the data is open) gets :class:`StationEmbedding`, gridded fields the backbone's."""
        return "station_embedding" if (cfg.get("stats") or {}).get("station") else "backbone"

    def check_stem(self, stem, cfg, source):
        """A station embedding needs station data: the demo is gridded; other sources say so once opened."""
        if stem != "station_embedding":
            return
        if source == "demo" or (cfg.get("stats") and not cfg["stats"].get("station")):
            where = "the demo" if source == "demo" else "this data"
            raise ValueError(f"'station_embedding' embeds (time, station) data, but {where} is a gridded field; "
                             f"use 'backbone' or 'auto'")

    def make_stem(self, stem, cfg, backbone_stem):
        """:class:`StationEmbedding` of every station's ``C'`` values to ``station_embed_dim`` channels, then the
        backbone's stem on them."""
        dim = int(cfg["station_embed_dim"])
        return nn.Sequential(StationEmbedding(self.in_chans(cfg), dim, int(cfg["stats"]["grid"][1])), backbone_stem(dim))

    def in_chans(self, cfg=None) -> int:
        cfg = self.config(cfg)
        if cfg["variables"] is None:
            raise ValueError("weather: in_chans needs cfg['variables'] (or use m.fitted_config(dsd))")
        return len(cfg["variables"]) * int(cfg["history"]) + (cfg["nan_policy"] == "mask")

    def input_size(self, cfg=None) -> tuple[int, int]:
        cfg = self.config(cfg)
        if cfg["image_size"] is not None:
            return tuple(cfg["image_size"])
        if "grid" not in (cfg.get("stats") or {}):
            raise ValueError("weather: input_size needs image_size or a fitted config (m.fitted_config(dsd))")
        return tuple(cfg["stats"]["grid"])

    # ----------------------------------------------------------------- xarray -> rows
    def from_xarray(self, ds, cfg: dict | None = None, what: str = "xarray Dataset", seed: int = 0, path=None):
        """Any xarray Dataset -> ``DatasetDict`` with transforms (the generic entry point). ``path``: the file /
        store / folder ``ds`` was opened from, so that DataLoader workers can reopen it (see :func:`register_source`)."""
        cfg = self.config(cfg)
        raw = self.rows_from_xarray(ds, cfg, what, source=register_source(ds, path))
        return self.attach(raw, self.fit_config(raw, self._with_layout(ds, cfg, what)))

    def _with_layout(self, ds, cfg, what):
        dims = find_dims(ds, what)
        cfg = dict(cfg)
        cfg["variables"] = self._variables(ds, cfg["variables"], dims, what)
        cfg["target_variables"] = self._variables(ds, cfg["target_variables"] or cfg["variables"], dims, what)
        return cfg

    @staticmethod
    def _variables(ds, names, dims, what):
        space = [dims["station"]] if dims["station"] else [dims["lat"], dims["lon"]]
        if names is None:
            names = [v for v in ds.data_vars if set(ds[v].dims) == {dims["time"], *space}]
        missing = [v for v in names if v not in ds.data_vars]
        if missing:
            raise ValueError(f"{what}: variable(s) {missing} not found; it has {list(ds.data_vars)}")
        if not names:
            raise ValueError(f"{what}: no data variable has dims (time, {', '.join(space)})")
        return list(names)

    def rows_from_xarray(self, ds, cfg: dict, what: str, source: str | None = None):
        """One tiny row per (history + horizon) window: its first time step (``start``) in the archive named by
        ``source`` (default: ``ds`` itself, in memory), never the fields, which the transform reads per access.
        Splits are chronological blocks. The archive is streamed once to refuse non-finite values (policy
        ``"raise"``) before any training, naming the variable and the first bad time."""
        import datasets

        source = source or register_source(ds)
        cfg = self._with_layout(ds, cfg, what)
        dims = find_dims(ds, what)
        times = ds[dims["time"]].values
        hist, hor = int(cfg["history"]), int(cfg["horizon"])
        if len(times) < hist + hor + 2:
            raise ValueError(f"{what}: {len(times)} time steps is too few for history={hist} + horizon={hor}")
        label_names = None
        if cfg["label_variable"]:
            lab = ds[cfg["label_variable"]]
            if lab.dims != (dims["time"],):
                raise ValueError(f"{what}: label_variable {cfg['label_variable']!r} must have dims (time,), has {lab.dims}")
            values = [str(v) for v in lab.values]
            label_names = sorted(set(values))
        if cfg["nan_policy"] == "raise":
            names = list(dict.fromkeys(cfg["variables"] + ([] if label_names else cfg["target_variables"])))
            _refuse_non_finite(ds, dims, names, times, what)
        n_t = len(times)
        bounds = np.cumsum([0] + [round(f * n_t) for f in cfg["split_fractions"][:2]] + [n_t])
        bounds[-1] = n_t
        feats = {"source": datasets.Value("string"), "start": datasets.Value("int64"), "time": datasets.Value("string")}
        if label_names is not None:
            feats["label"] = datasets.ClassLabel(names=label_names)
        features = datasets.Features(feats)
        out = {}
        for split, lo, hi in zip(("train", "validation", "test"), bounds[:-1], bounds[1:]):
            starts = list(range(lo, hi - hor - hist + 1))  # the whole window lies inside [lo, hi)
            if not starts:
                raise ValueError(f"{what}: the {split} block ({hi - lo} steps) is shorter than a window")
            rows = {"source": [source] * len(starts), "start": starts,
                    "time": [str(times[s + hist - 1]) for s in starts]}
            if label_names is not None:
                rows["label"] = [label_names.index(values[s + hist - 1 + hor]) for s in starts]
            out[split] = datasets.Dataset.from_dict(rows, features=features)
        return datasets.DatasetDict(out)

    def fit_config(self, raw, cfg):
        """Per-variable mean / std over the train split's input windows (targets share the same stats), from one
        streaming pass over the train block: a time step counts once per window that holds it as an input, as if
        the windows had been stacked. Masked (NaN) values are left out."""
        rows = raw["train"].with_format(None)
        ds = source_dataset(rows[0]["source"])
        dims = find_dims(ds, "weather train split")
        hist = int(cfg["history"])
        starts = np.asarray(rows["start"], dtype=np.int64)
        lo = int(starts.min())
        weight = np.convolve(np.bincount(starts - lo), np.ones(hist))  # windows holding step lo + i as an input
        n_vars = len(cfg["variables"])
        s1, s2, count = np.zeros(n_vars), np.zeros(n_vars), np.zeros(n_vars)
        for a, block in _blocks(ds, dims, cfg["variables"], lo, lo + len(weight)):
            w = weight[a - lo : a - lo + block.shape[1]]
            for i in range(n_vars):
                x = block[i].reshape(block.shape[1], -1).astype(np.float64)
                finite = np.isfinite(x)
                x[~finite] = 0.0
                s1[i] += w @ x.sum(1)
                s2[i] += np.einsum("t,ti,ti->", w, x, x)
                count[i] += w @ finite.sum(1)
        empty = [v for v, n in zip(cfg["variables"], count) if n == 0]
        if empty:
            raise ValueError(f"weather: variable(s) {empty} have no finite value in the train split")
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0)).clip(min=1e-6)
        stats = {v: [float(m), float(s)] for v, m, s in zip(cfg["variables"], mean, std)}
        missing = [v for v in cfg["target_variables"] if v not in stats]
        if missing and not cfg["label_variable"]:
            raise ValueError(f"weather: target variable(s) {missing} must also be input variables (stats come from them)")
        station = dims["station"] is not None
        grid = [1, ds.sizes[dims["station"]]] if station else [ds.sizes[dims["lat"]], ds.sizes[dims["lon"]]]
        return {**cfg, "stats": {"vars": stats, "grid": grid, "station": station}}

    def climatology(self, train, cfg: dict) -> torch.Tensor | None:
        """Mean normalised target field of each variable at each lead step over the train windows (NaN left
        out; 0, the mean, where no value is valid), from one streaming pass over the train targets' time steps."""
        if cfg["label_variable"]:
            return None
        rows = train.with_format(None)  # the table itself, not the transformed samples
        ds = source_dataset(rows[0]["source"])
        dims = find_dims(ds, "weather train split")
        hist, hor = int(cfg["history"]), int(cfg["horizon"])
        names = cfg["target_variables"]
        first = np.asarray(rows["start"], dtype=np.int64) + hist  # each window's first target step
        lo = int(first.min())
        per_lead = np.stack([np.bincount(first - lo + k, minlength=int(first.max()) - lo + hor) for k in range(hor)])
        c, h, w = self.target_shape_from_cfg(cfg)
        total, count = np.zeros((len(names), hor, h, w)), np.zeros((len(names), hor, h, w))
        for a, block in _blocks(ds, dims, names, lo, lo + per_lead.shape[1]):
            u = per_lead[:, a - lo : a - lo + block.shape[1]].astype(np.float64)  # (lead, step) weights
            finite = np.isfinite(block)
            total += np.einsum("kt,vthw->vkhw", u, np.where(finite, block, 0.0))
            count += np.einsum("kt,vthw->vkhw", u, finite.astype(np.float64))
        st = cfg["stats"]["vars"]
        mean = np.array([st[v][0] for v in names])[:, None, None, None]
        std = np.array([st[v][1] for v in names])[:, None, None, None]
        clim = np.where(count > 0, (total / np.maximum(count, 1) - mean) / std, 0.0)
        return torch.as_tensor(clim.reshape(1, -1), dtype=torch.float32)

    def read_window(self, source: str, start: int, cfg: dict) -> dict:
        """The raw arrays of the window starting at time step ``start`` of ``source``: ``x`` (``(v k) h w``) and,
        when forecasting, ``y`` (``(v_t k) h w``); only those ``history + horizon`` steps are read."""
        ds = source_dataset(source)
        hist, hor = int(cfg["history"]), int(cfg["horizon"])
        forecast = not cfg["label_variable"]
        steps = _read_steps(ds, find_dims(ds, f"weather source {source!r}"), cfg["variables"],
                            start, start + hist + (hor if forecast else 0))
        out = {"x": rearrange(steps[:, :hist], "v k h w -> (v k) h w")}
        if forecast:
            idx = [cfg["variables"].index(v) for v in cfg["target_variables"]]
            out["y"] = rearrange(steps[idx, hist:], "v k h w -> (v k) h w")
        return out

    # ----------------------------------------------------------------- adapter
    def _norm(self, a: torch.Tensor, names, cfg, steps) -> torch.Tensor:
        st = cfg["stats"]["vars"]
        mean = torch.tensor([st[v][0] for v in names for _ in range(steps)], dtype=a.dtype)
        std = torch.tensor([st[v][1] for v in names for _ in range(steps)], dtype=a.dtype)
        return (a - mean[:, None, None]) / std[:, None, None]

    def denormalize(self, pred: torch.Tensor, cfg: dict) -> torch.Tensor:
        """Standardised predictions ``[..., V_t * horizon * H * W]`` (flat or shaped) -> physical units."""
        shape = pred.shape
        c, h, w = self.target_shape_from_cfg(cfg)
        p = pred.reshape(-1, c, h, w)
        st = cfg["stats"]["vars"]
        mean = torch.tensor([st[v][0] for v in cfg["target_variables"] for _ in range(cfg["horizon"])], dtype=p.dtype)
        std = torch.tensor([st[v][1] for v in cfg["target_variables"] for _ in range(cfg["horizon"])], dtype=p.dtype)
        return (p * std[:, None, None] + mean[:, None, None]).reshape(shape)

    def _check_stats(self, cfg):
        if not cfg.get("stats"):
            raise ValueError("weather: cfg has no normalisation stats; pass m.fitted_config(dsd) from a loaded dataset")

    def to_input(self, raw, cfg, train):
        return self._tensors(raw, cfg, train)[0]

    def example(self, raw, cfg, train):
        x, y = self._tensors(raw, cfg, train)
        return x, (torch.tensor(int(raw["label"]), dtype=torch.long) if y is None else y.reshape(-1))

    def _tensors(self, raw, cfg, train):
        """Normalised input ``C' x H x W`` and target ``V_t*horizon x H x W`` (None in label mode / prediction)."""
        self._check_stats(cfg)
        what = f"weather sample at {raw.get('time', '?')}"
        if "x" not in raw:  # a table row: read its window from the archive now (in the DataLoader worker)
            raw = {**raw, **self.read_window(raw["source"], int(raw["start"]), cfg)}
        x = torch.as_tensor(np.asarray(raw["x"], np.float32))
        if cfg["nan_policy"] == "mask":
            valid = torch.isfinite(x).all(0, keepdim=True)
            x = torch.cat([self._norm(x, cfg["variables"], cfg, int(cfg["history"])).nan_to_num(0.0, 0.0, 0.0),
                           valid.to(x.dtype)])
        else:
            x = self._norm(check_finite(x, what), cfg["variables"], cfg, int(cfg["history"]))
        y = None
        if raw.get("y") is not None:
            y = torch.as_tensor(np.asarray(raw["y"], np.float32))
            y = self._norm(y.masked_fill(~torch.isfinite(y), float("nan")), cfg["target_variables"], cfg, int(cfg["horizon"]))
        station = cfg["stats"].get("station", False)
        if train and cfg["lon_roll"] and not station:
            shift = int(torch.randint(0, x.shape[-1], ()))
            x = torch.roll(x, shift, dims=-1)
            y = torch.roll(y, shift, dims=-1) if y is not None else None
        if station:
            x = _stations_to_grid(x)
        elif cfg["image_size"] is not None:
            x = torch.nn.functional.interpolate(x[None], size=tuple(cfg["image_size"]), mode="bilinear", align_corners=False)[0]
        return x.contiguous(), y

    def target_shape_from_cfg(self, cfg) -> tuple[int, int, int]:
        grid = cfg["stats"]["grid"]
        return (len(cfg["target_variables"]) * int(cfg["horizon"]), int(grid[0]), int(grid[1]))

    def field_shape(self, cfg) -> tuple[int, int, int] | None:
        """Gridded forecasts are fields ``(V_t * horizon, H, W)``; station rows and class labels are not."""
        if cfg["label_variable"] or cfg["stats"].get("station", False):
            return None
        return self.target_shape_from_cfg(cfg)

    def persistence_channels(self, cfg) -> list[int] | None:
        """Input channel ``v * history + history - 1`` (variable ``v``'s newest step) per target channel."""
        if cfg["label_variable"]:
            return None
        hist = int(cfg["history"])
        return [cfg["variables"].index(v) * hist + hist - 1 for v in cfg["target_variables"]
                for _ in range(int(cfg["horizon"]))]

    def last_step(self, x, cfg) -> torch.Tensor | None:
        """Persistence: each target variable's newest input step repeated over the horizon, on the target grid."""
        channels = self.persistence_channels(cfg)
        if channels is None:
            return None
        p = x[:, channels]
        _, h, w = self.target_shape_from_cfg(cfg)
        if cfg["stats"].get("station", False):  # side x side grid -> the first S cells, as a 1 x S row
            p = rearrange(p, "b c h w -> b c (h w)")[:, :, :w]
        elif tuple(p.shape[-2:]) != (h, w):  # image_size resized the input
            p = torch.nn.functional.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        return p.reshape(p.shape[0], -1)

    def target_shape(self, dsd) -> tuple[int, int, int]:
        """Unflattened regression target ``(V_t * horizon, H, W)`` (``H = 1, W = S`` for stations)."""
        return self.target_shape_from_cfg(self.fitted_config(dsd))

    def label_names(self, dsd) -> list[str]:
        """Class names (label mode) or the target variable names (forecast mode)."""
        cfg = self.fitted_config(dsd)
        if cfg["label_variable"]:
            return super().label_names(dsd)
        return list(cfg["target_variables"])

    def num_outputs(self, dsd) -> int:
        cfg = self.fitted_config(dsd)
        if cfg["label_variable"]:
            return len(super().label_names(dsd))
        return int(np.prod(self.target_shape_from_cfg(cfg)))

    def raw_from_file(self, path, cfg):
        """The last ``history`` steps of a netCDF file / zarr store as one input row."""
        self._check_stats(cfg)
        ds = open_xarray(path)
        what = f"weather file {str(path)!r}"
        dims = find_dims(ds, what)
        hist = int(cfg["history"])
        if ds.sizes[dims["time"]] < hist:
            raise ValueError(f"{what}: has {ds.sizes[dims['time']]} time steps, history needs {hist}")
        missing = [v for v in cfg["variables"] if v not in ds]
        if missing:
            raise ValueError(f"{what}: variable {missing[0]!r} (in the config) is missing")
        n_t = ds.sizes[dims["time"]]
        x = _read_steps(ds, dims, cfg["variables"], n_t - hist, n_t)
        return {"x": rearrange(x, "v k h w -> (v k) h w"), "time": str(ds[dims["time"]].values[-1])}

    # ----------------------------------------------------------------- a user's own dataset
    optional_fields = ("time",)
    needs_label = False

    def from_dataset(self, dsd, input_column, label_column=None, splits=None, cfg=None, seed=0, time=None):
        """A table of time steps -> the windows of :meth:`from_xarray` (see :meth:`Modality.from_dataset`).

        One row per time step, in time order; each input column is one variable's field (``H x W`` nested
        lists, or ``S`` station values); ``time`` names a column of time stamps (default: the row number);
        ``label_column`` set makes it the classification ``label_variable``. The splits stay chronological
        blocks (no window crosses one): without validation, the last ``split_fractions`` share of train is
        validation; with train alone, ``split_fractions`` cut it, as for files.
        """
        import xarray as xr

        cfg = self.config(cfg)
        chosen = select_splits(dsd, splits, "weather")
        inputs = [input_column] if isinstance(input_column, str) else list(input_column)
        cols = inputs + [c for c in (label_column, time) if c]
        for split, ds in chosen.items():
            missing = [c for c in cols if c not in ds.column_names]
            if missing:
                raise ValueError(f"weather: split {split!r} has no column(s) {missing}; its columns are {ds.column_names}")
        if "validation" in chosen and "test" not in chosen:
            raise ValueError("weather: the dataset has a 'validation' but no 'test' split; map one with splits=")
        if label_column:
            known = set(map(str, chosen["train"].unique(label_column)))
            for split, ds in chosen.items():
                unknown = sorted(set(map(str, ds.unique(label_column))) - known)
                if unknown:
                    raise ValueError(f"weather: split {split!r} has label(s) {unknown} in column {label_column!r} "
                                     f"that train does not have")
        parts = [chosen[s].select_columns(cols).with_format("numpy")[:] for s in SPLITS if s in chosen]
        table = {c: np.concatenate([np.asarray(part[c]) for part in parts]) for c in cols}
        shapes = {c: table[c].shape[1:] for c in inputs}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) not in (1, 2):
            raise ValueError(f"weather: input columns must all hold fields of one shape (H x W, or S stations); "
                             f"got {shapes}")
        space = ("lat", "lon") if len(shapes[inputs[0]]) == 2 else ("station",)
        data = {c: (("time", *space), table[c].astype(np.float32)) for c in inputs}
        if label_column:
            data[label_column] = (("time",), table[label_column].astype(str))
        steps = len(table[inputs[0]])
        ds = xr.Dataset(data, coords={"time": table[time] if time else np.arange(steps)})
        cfg = {**cfg, "variables": cfg["variables"] or inputs, "label_variable": label_column or cfg["label_variable"]}
        sizes = [len(chosen[s]) for s in SPLITS if s in chosen]
        if len(sizes) == 2:  # no validation: the tail of train
            f_train, f_val, _ = cfg["split_fractions"]
            n_val = max(1, round(sizes[0] * f_val / (f_train + f_val)))
            sizes = [sizes[0] - n_val, n_val, sizes[1]]
        if len(sizes) == 3:
            cfg["split_fractions"] = [n / steps for n in sizes]
        return self.from_xarray(ds, cfg, what="weather dataset")

    # ----------------------------------------------------------------- sources
    def load_folder(self, path, cfg, seed=0):
        ds = open_xarray(path)
        return self.rows_from_xarray(ds, cfg, f"weather folder {str(path)!r}", source=register_source(ds, path))

    def load(self, source="demo", path=None, cfg=None, seed=0, cache_dir=None, **kw):
        """As :meth:`Modality.load`; the config is completed with the variables found in the data."""
        if source == "hub":
            hub_path = kw.pop("hub_path", None)
            if not hub_path:
                raise ValueError(f"weather: source='hub' needs hub_path=...; {self.hub.notes}")
            cfg = self.config(cfg)
            local = hub_download(hub_path)
            return self.from_xarray(open_xarray(local), cfg, what=f"Hub file {hub_path!r}", path=local)
        cfg = self.config(cfg)
        if source == "dataset":
            return self.load_user_dataset(path, cfg, seed=seed, cache_dir=cache_dir, **kw)
        if source == "demo":
            path = self.ensure_demo(cache_dir=cache_dir, seed=seed, **kw)
            what = f"weather demo {str(path)!r}"
        elif source == "folder":
            if path is None or not Path(path).exists():
                raise ValueError(f"weather: source='folder' needs an existing path=, got {path!r}")
            what = f"weather folder {str(path)!r}"
        else:
            raise ValueError(f"weather: unknown source {source!r}; expected one of {SOURCES}")
        return self.from_xarray(open_xarray(path), cfg, what=what, seed=seed, path=path)

    def make_demo(self, root, seed: int = 0, days: int = 60, nlat: int = 32, nlon: int = 64):
        """Hourly global fields on a ``nlat x nlon`` grid for ``days`` days, WeatherBench-style files."""
        import pandas as pd
        import xarray as xr

        root = Path(root)
        t2m, q = simulate_fields(days * 24, nlat, nlon, seed)
        lat = np.linspace(-90 + 90 / nlat, 90 - 90 / nlat, nlat)
        lon = np.arange(nlon) * 360.0 / nlon
        time = pd.date_range("2000-01-01", periods=days * 24, freq="h")
        ds = xr.Dataset(
            {
                "t2m": (("time", "lat", "lon"), t2m, {"units": "K", "long_name": "2 m temperature"}),
                "q": (("time", "lat", "lon"), q, {"units": "g kg-1", "long_name": "specific humidity"}),
            },
            coords={"time": time, "lat": lat, "lon": lon},
            attrs={"source": "uniperc synthetic demo: advection + diffusion + diurnal cycle"},
        )
        for var in ds.data_vars:
            for month, part in ds[[var]].groupby("time.month"):
                out = root / var / f"{var}_{month:02d}.nc"
                out.parent.mkdir(parents=True, exist_ok=True)
                part.to_netcdf(out)
        return root


def _stations_to_grid(x: torch.Tensor) -> torch.Tensor:
    """``C x 1 x S`` station row -> ``C x side x side`` (row-major, zero padded)."""
    c, _, s = x.shape
    side = math.ceil(math.sqrt(s))
    flat = x.new_zeros(c, side * side)
    flat[:, :s] = x[:, 0]
    return rearrange(flat, "c (h w) -> c h w", h=side)


_SOURCES: dict = {}  # this process's open archives: "file:<path>" by (pid, key), in-memory Datasets by key
_MEMORY_KEYS = itertools.count()
BLOCK_BYTES = 8 << 20  # float32 bytes read at a time by the streaming passes (statistics, the finiteness check)
# An archive up to this size is read into each process's memory when first opened: a window is then an array slice
# (the demo grid: 0.5 instead of 5.1 ms a sample, most of it dask's per-read graph); larger ones stay lazy on disk.
IN_MEMORY_BYTES = 256 << 20


def _in_memory_if_small(ds):
    """``ds`` loaded into memory if it holds at most :data:`IN_MEMORY_BYTES`, else ``ds`` itself (lazy)."""
    import dask

    if ds.nbytes > IN_MEMORY_BYTES:
        return ds
    with dask.config.set(scheduler="synchronous"):
        return ds.load()


def register_source(ds, path=None) -> str:
    """The key a row uses to name its archive. With ``path`` it is ``file:<path>``, and any process that does
    not have the archive open (a DataLoader worker) reopens it lazily from there; without, ``memory:<n>`` names
    a Dataset that exists only in this process (and in forked DataLoader workers, which inherit it)."""
    key = f"file:{Path(path).resolve()}" if path is not None else f"memory:{next(_MEMORY_KEYS)}"
    _SOURCES[_slot(key)] = _in_memory_if_small(ds)
    return key


def _slot(key: str):
    # per process: a forked worker must not share the parent's netCDF / HDF5 handles, it reopens the path
    return (os.getpid(), key) if key.startswith("file:") else key


def source_dataset(key: str):
    """The (lazily opened) ``xarray.Dataset`` a row's ``source`` names, opened once per process."""
    slot = _slot(key)
    if slot not in _SOURCES:
        if not key.startswith("file:"):
            raise ValueError(f"weather: the rows refer to an in-memory xarray Dataset ({key}) that this process "
                             "does not have (a spawned DataLoader worker?); write it with to_zarr and load that path")
        _SOURCES[slot] = _in_memory_if_small(open_xarray(key[len("file:"):]))
    return _SOURCES[slot]


def _read_steps(ds, dims, names, lo: int, hi: int) -> np.ndarray:
    """``(V, hi - lo, H, W)`` float32 of ``names`` at time steps ``lo .. hi-1``, reading only the chunks that
    hold them (dask's synchronous scheduler: no thread pool per DataLoader worker); non-finite values as NaN.
    Stations come as a ``1 x S`` row."""
    import dask

    space = [dims["station"]] if dims["station"] else [dims["lat"], dims["lon"]]
    window = ds[list(names)].isel({dims["time"]: slice(lo, hi)})
    with dask.config.set(scheduler="synchronous"):
        window = window.compute()
    out = np.stack([np.asarray(window[v].transpose(dims["time"], *space).values, np.float32) for v in names])
    out[~np.isfinite(out)] = np.nan
    return out if dims["station"] is None else out[:, :, None, :]


def _blocks(ds, dims, names, lo: int, hi: int):
    """``(first step, block)`` pairs covering steps ``lo .. hi-1``, :data:`BLOCK_BYTES` at a time."""
    step_bytes = 4 * len(names) * math.prod(ds[names[0]].shape) // ds.sizes[dims["time"]]
    n = max(1, BLOCK_BYTES // step_bytes)
    for a in range(lo, hi, n):
        yield a, _read_steps(ds, dims, names, a, min(a + n, hi))


def _refuse_non_finite(ds, dims, names, times, what: str) -> None:
    """One streaming pass over the whole archive: ``ValueError`` naming the first variable with NaN / inf,
    how many it has and the first time step that holds one."""
    bad = np.zeros(len(names), dtype=np.int64)
    first: list = [None] * len(names)
    for a, block in _blocks(ds, dims, names, 0, len(times)):
        nan = np.isnan(block).reshape(len(names), block.shape[1], -1)
        bad += nan.sum((1, 2))
        for i, steps in enumerate(nan.any(2)):
            if first[i] is None and steps.any():
                first[i] = times[a + int(np.argmax(steps))]
    for v, n, t in zip(names, bad, first):
        if n:
            raise ValueError(f"{what}: variable {v!r} has {int(n)} non-finite value(s) (first at time {t}); "
                             "fill them before loading, or set nan_policy='mask'")


def open_xarray(path):
    """A netCDF file, a zarr store, or a folder tree of them -> one lazily opened ``xarray.Dataset`` (the fields
    stay on disk until a window or a streaming block reads them; several files combine as dask arrays)."""
    import xarray as xr

    path_s = str(path)
    if path_s.startswith("hf://"):
        return open_xarray(hub_download(path_s))
    p = Path(path)
    if _is_zarr(p) or p.is_file():
        return _open_one(p, use_dask=False)
    files = sorted(f for f in p.rglob("*") if f.suffix in (".nc", ".nc4", ".netcdf") or f.suffix == ".zarr")
    files = [f for f in files if not any(part.endswith(".zarr") for part in f.relative_to(p).parts[:-1])]
    if not files:
        raise ValueError(f"weather: no .nc files or .zarr stores under {path_s!r}")
    # combining files lazily needs dask arrays (xarray would concatenate plain lazy arrays by loading them)
    parts = [_open_one(f, use_dask=len(files) > 1) for f in files]
    return xr.combine_by_coords(parts, combine_attrs="drop_conflicts")


def _is_zarr(p: Path) -> bool:
    return p.suffix == ".zarr" or (p / ".zgroup").exists() or (p / "zarr.json").exists()


def _open_one(p: Path, use_dask: bool):
    """One netCDF file or zarr store, opened lazily, uncached (``use_dask``: as dask arrays in the file's own
    chunks; else xarray's lazy indexing, which reads a window with one zarr / netCDF call, ~4x faster per
    sample); any reader error becomes a ``ValueError`` naming it (xarray's "no matching IO backend" message for
    a file that is not netCDF names no file)."""
    import xarray as xr

    chunks = {} if use_dask else None
    try:
        if _is_zarr(p):
            return xr.open_dataset(p, engine="zarr", chunks=chunks, cache=False)
        return xr.open_dataset(p, chunks=chunks, cache=False)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"weather: cannot read {str(p)!r} as netCDF or zarr with xarray ({e})") from None


def hub_download(url: str) -> Path:
    """``hf://datasets/<owner>/<repo>/<file.nc | store.zarr>`` -> a local copy in huggingface_hub's cache."""
    prefix = "hf://datasets/"
    parts = url[len(prefix):].strip("/").split("/", 2) if url.startswith(prefix) else []
    if len(parts) < 3:
        raise ValueError(f"weather: Hub path {url!r} must look like hf://datasets/<owner>/<repo>/<file>")
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, inner = f"{parts[0]}/{parts[1]}", parts[2]
    if inner.endswith(".zarr"):
        return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=[f"{inner}/**"])) / inner
    return Path(hf_hub_download(repo, inner, repo_type="dataset"))


def simulate_fields(steps: int, nlat: int, nlon: int, seed: int, diurnal: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Temperature and humidity on a global grid, hourly: semi-Lagrangian advection by a zonal jet
    with a meandering meridional wind, explicit diffusion, a diurnal heating cycle tied to local solar time,
    relaxation to a latitude profile and randomly injected warm / moist anomalies. ``diurnal`` is the
    peak heating rate (K per hour) of the day-night cycle."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    lat = np.linspace(-90 + 90 / nlat, 90 - 90 / nlat, nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    la, lo = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    t_eq = 300.0 - 45.0 * np.sin(la) ** 2  # K, latitude profile
    q_eq = 18.0 * np.cos(la) ** 3 + 0.5  # g/kg
    jet = 1.2 * np.cos(la) * (1 + 0.6 * np.sin(2 * la) ** 2)  # zonal speed, grid cells per hour
    ii, jj = np.meshgrid(np.arange(nlat), np.arange(nlon), indexing="ij")
    temp = t_eq + gaussian_filter(rng.normal(0, 4, (nlat, nlon)), 3, mode="wrap")
    hum = q_eq * np.exp(gaussian_filter(rng.normal(0, 0.3, (nlat, nlon)), 3, mode="wrap"))
    out_t = np.empty((steps, nlat, nlon), np.float32)
    out_q = np.empty((steps, nlat, nlon), np.float32)
    for n in range(steps):
        hour = n % 24
        # meandering meridional wind: a zonal wave-3 drifting east (0.8 cells/h, slower than the jet)
        v = 0.3 * np.sin(3 * (lo - 2 * np.pi * 0.8 * n / nlon)) * np.cos(la)
        src_i = np.clip(ii - v, 0, nlat - 1)
        src_j = (jj - jet) % nlon
        temp = map_coordinates(temp, [src_i, src_j], order=1, mode="grid-wrap")
        hum = map_coordinates(hum, [src_i, src_j], order=1, mode="grid-wrap")
        for field in (temp, hum):  # diffusion (periodic in lon, reflecting at the poles)
            lap = (np.roll(field, 1, 1) + np.roll(field, -1, 1) - 2 * field
                   + np.vstack([field[1:2], field[:-1]]) + np.vstack([field[1:], field[-2:-1]]) - 2 * field)
            field += 0.08 * lap
        solar = np.cos(2 * np.pi * (hour / 24.0) + lo - np.pi) * np.cos(la)  # local-noon maximum
        temp += diurnal * solar - 0.02 * (temp - t_eq)
        hum += 0.02 * (q_eq - hum) + 0.05 * np.clip(solar, 0, None) * q_eq / 18.0
        if rng.random() < 0.05:  # a warm, moist anomaly appears somewhere
            ci, cj = rng.integers(nlat), rng.integers(nlon)
            d2 = (ii - ci) ** 2 + np.minimum(np.abs(jj - cj), nlon - np.abs(jj - cj)) ** 2
            blob = np.exp(-d2 / (2 * rng.uniform(2, 5) ** 2))
            temp += rng.uniform(-6, 6) * blob
            hum *= 1 + rng.uniform(0, 0.5) * blob
        out_t[n], out_q[n] = temp, hum
    return out_t, out_q


MODALITY = WeatherModality()
