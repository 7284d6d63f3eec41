"""Bring your own dataset: every modality from a user's ``DatasetDict`` (in memory, ``save_to_disk``, parquet),
with unusual column names and string labels, through ``from_dataset``, the trainer and ``uniperc.evaluate``.

The media columns are declared ``Audio`` / ``Image`` / ``Video`` with decoding on, as ``load_dataset`` gives
them: ``datasets`` would decode Audio / Video through torchcodec, which is not installed, so these tests also
show that our own decoders read the bytes.
"""
from __future__ import annotations

import io
import math

import datasets
import numpy as np
import pytest

import uniperc.modalities as modalities
from uniperc.train import compose, run
from uniperc.train.config import CONFIG_DIR

TINY = str(CONFIG_DIR / "tiny.yaml")
CLASSES = ("ping", "hum")  # string labels, not in sorted order
ROWS = {"train": 4, "validation": 1, "test": 2}  # per class


def _wav(freq: float, rng) -> bytes:
    import soundfile as sf

    t = np.arange(4000) / 8000.0
    wave = (0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.normal(size=t.shape)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 8000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _png(level: int, rng) -> bytes:
    from PIL import Image

    arr = np.clip(level + rng.normal(0, 10, (12, 12, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mp4(level: int, rng, frames: int = 5, size: int = 16) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            arr = np.full((size, size, 3), level, np.uint8)
            arr[:, (k * 3) % size] = 255 - level
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _cloud(kind: str, rng, n: int = 64) -> list:
    p = rng.normal(size=(n, 3))
    p = p / np.linalg.norm(p, axis=1, keepdims=True) if kind == "ping" else np.clip(p, -1, 1) * [1, 1, 0.2]
    return p.astype(np.float32).tolist()


# per modality: the user's input column, how to build one row's input, its Features, optional columns
# (raw field -> (the user's column, its value from the input))
SPECS = {
    "audio": ("clip", lambda y, rng: {"bytes": _wav(300 if y == "ping" else 1200, rng), "path": None},
              datasets.Audio(), {"speaker": ("who", lambda x: f"spk{len(x['bytes']) % 3}")}),
    "image": ("picture", lambda y, rng: {"bytes": _png(40 if y == "ping" else 200, rng), "path": None},
              datasets.Image(), {}),
    "point_cloud": ("xyz", _cloud, None,
                    {"normals": ("nrm", lambda x: (np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True)).tolist())}),
    "video": ("movie", lambda y, rng: {"bytes": _mp4(30 if y == "ping" else 220, rng), "path": None},
              datasets.Video(), {}),
}


def _weather(splits: dict[str, int]) -> datasets.DatasetDict:
    """One row per hour: two fields on a 4 x 8 grid (an advected wave), a time stamp column."""
    out, t0 = {}, 0
    for split, n in splits.items():
        t = np.arange(t0, t0 + n)[:, None, None]
        lon = np.arange(8)[None, None, :]
        lat = np.arange(4)[None, :, None]
        temp = 280 + 5 * np.sin(2 * np.pi * (lon - t) / 8) + lat
        out[split] = datasets.Dataset.from_dict({
            "temp_2m": temp.astype(np.float32).tolist(), "humid": (temp / 30).astype(np.float32).tolist(),
            "stamp": [f"2020-01-01T{h:04d}" for h in range(t0, t0 + n)]})
        t0 += n
    return datasets.DatasetDict(out)


WEATHER_COLUMNS = {"inputs": ["temp_2m", "humid"], "time": "stamp"}


def make_user_dataset(modality: str, splits=("train", "validation", "test"), seed: int = 0) -> datasets.DatasetDict:
    """A tiny labelled DatasetDict as a researcher would hold it (string labels in a ``kind`` column)."""
    if modality == "weather":
        return _weather({s: {"train": 24, "validation": 6, "test": 6}[s] for s in splits})
    if modality not in SPECS:
        raise NotImplementedError(f"test_byo_dataset has no tiny dataset builder for the new modality {modality!r}")
    column, make, feature, extras = SPECS[modality]
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        labels = [c for c in CLASSES for _ in range(ROWS[split])]
        inputs = [make(y, rng) for y in labels]
        extra = {col: [value(x) for x in inputs] for col, value in extras.values()}
        ds = datasets.Dataset.from_dict({column: inputs, "kind": labels, **extra})
        out[split] = ds.cast_column(column, feature) if feature is not None else ds
    return datasets.DatasetDict(out)


def columns_of(modality: str) -> dict:
    if modality == "weather":
        return dict(WEATHER_COLUMNS)
    column, _, _, extras = SPECS[modality]
    return {"inputs": column, "label": "kind", **{raw: col for raw, (col, _) in extras.items()}}


def save_both(modality: str, root) -> tuple[str, str]:
    """The dataset saved with ``save_to_disk`` (train / validation / test) and as parquet files (train and test
    only: validation is carved out of train)."""
    dsd = make_user_dataset(modality)
    saved, parquet = root / "saved", root / "parquet"
    dsd.save_to_disk(str(saved))
    parquet.mkdir()
    for split in ("train", "test"):
        dsd[split].to_parquet(str(parquet / f"{split}.parquet"))
    return str(saved), str(parquet)


def tiny_cfg(modality: str) -> dict:
    """The adapter settings of configs/tiny.yaml for this modality."""
    section = (compose([modality], TINY)["modalities"].get(modality) or {})
    return section.get("config") or {}


ALL = modalities.list_modalities()


@pytest.mark.parametrize("modality", ALL)
def test_from_dataset_gives_batches_from_saved_and_parquet(tmp_path, modality):
    m = modalities.get(modality)
    saved, parquet = save_both(modality, tmp_path)
    cfg = tiny_cfg(modality)
    expected = None
    for where in (saved, parquet):
        dsd = m.load("dataset", path=where, cfg=cfg, columns=columns_of(modality))
        assert set(dsd) == {"train", "validation", "test"} and all(len(dsd[s]) for s in dsd)
        fitted = m.fitted_config(dsd)
        x = dsd["train"][0]["inputs"]
        assert tuple(x.shape) == (m.in_chans(fitted), *m.input_size(fitted))
        assert np.isfinite(x.numpy()).all()
        if modality == "weather":
            assert fitted["variables"] == ["temp_2m", "humid"] and m.task_for(fitted) == "regression"
        else:
            assert m.label_names(dsd) == sorted(CLASSES)  # string labels -> one sorted ClassLabel
            names = dsd["test"].features["label"].names
            assert sorted(names[i] for i in dsd["test"].with_format(None)["label"]) == sorted(
                [c for c in CLASSES for _ in range(ROWS["test"])])
        expected = expected or len(dsd["test"])
        assert len(dsd["test"]) == expected


def test_parquet_files_by_data_files_and_optional_columns(tmp_path):
    """Parquet files whose names give no split, mapped with data_files; audio's speaker column arrives."""
    m = modalities.get("audio")
    dsd = make_user_dataset("audio")
    for split, name in (("train", "fit"), ("validation", "dev"), ("test", "final")):
        dsd[split].to_parquet(str(tmp_path / f"{name}.parquet"))
    out = m.load("dataset", path=tmp_path, cfg=tiny_cfg("audio"), columns=columns_of("audio"),
                 data_files={"train": "fit.parquet", "validation": "dev.parquet", "test": "final.parquet"})
    assert [len(out[s]) for s in ("train", "validation", "test")] == [8, 2, 4]
    assert out["test"].with_format(None)["speaker"] == dsd["test"]["who"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a save_to_disk dataset nor parquet"):
        m.load("dataset", path=tmp_path / "empty", columns=columns_of("audio"))


@pytest.mark.parametrize("modality", ["audio", "image", "video"])
def test_a_column_of_file_paths_is_read_as_media(tmp_path, modality):
    m = modalities.get(modality)
    dsd = make_user_dataset(modality)
    column = SPECS[modality][0]
    out = {}
    for split, ds in dsd.items():
        blobs = ds.cast_column(column, type(ds.features[column])(decode=False))[column]
        paths = []
        for i, blob in enumerate(blobs):
            paths.append(str(tmp_path / f"{split}_{i}.bin"))
            (tmp_path / f"{split}_{i}.bin").write_bytes(blob["bytes"])
        out[split] = ds.remove_columns(column).add_column(column, paths)
    dsd = m.from_dataset(datasets.DatasetDict(out), column, "kind", cfg=tiny_cfg(modality))
    assert dsd["test"][0]["inputs"].ndim == 3


@pytest.mark.parametrize("modality", ALL)
def test_from_dataset_in_memory_with_mapped_split_names(modality):
    m = modalities.get(modality)
    dsd = make_user_dataset(modality)
    dsd = datasets.DatasetDict({"fit": dsd["train"], "dev": dsd["validation"], "heldout": dsd["test"]})
    cols = columns_of(modality)
    kwargs = {"label_column": cols.pop("label", None), **{k: v for k, v in cols.items() if k != "inputs"}}
    out = m.from_dataset(dsd, cols["inputs"], splits={"train": "fit", "validation": "dev", "test": "heldout"},
                         cfg=tiny_cfg(modality), **kwargs)
    sizes = [len(out[s]) for s in ("train", "validation", "test")]
    if modality == "weather":  # rows are the windows (history 2 + horizon 1) inside each block of time steps
        assert sizes == [len(dsd[s]) - 2 for s in ("fit", "dev", "heldout")]
    else:
        assert sizes == [len(dsd[s]) for s in ("fit", "dev", "heldout")]
    assert out["validation"][0]["inputs"].ndim == 3


def test_class_labels_of_other_splits_are_re_encoded_by_name():
    m = modalities.get("image")
    dsd = make_user_dataset("image")
    dsd["train"] = dsd["train"].cast_column("kind", datasets.ClassLabel(names=["ping", "hum"]))
    dsd["test"] = dsd["test"].cast_column("kind", datasets.ClassLabel(names=["hum", "ping"]))
    out = m.from_dataset(dsd, "picture", "kind", cfg=tiny_cfg("image"))
    assert m.label_names(out) == ["ping", "hum"]  # a ClassLabel keeps its own order
    test = out["test"].with_format(None)
    assert [test.features["label"].int2str(y) for y in test["label"]] == dsd["test"].features["kind"].int2str(
        dsd["test"]["kind"])


@pytest.mark.parametrize("modality", ALL)
def test_bad_column_and_missing_split_name_the_problem(modality):
    m = modalities.get(modality)
    dsd = make_user_dataset(modality)
    cols = columns_of(modality)
    bad = dict(cols, inputs="no_such_column")
    with pytest.raises(ValueError, match="no_such_column") as err:
        m.from_dataset(dsd, cfg=tiny_cfg(modality), **m.dataset_columns(bad))
    assert str(sorted(dsd["train"].column_names)[0]) in str(err.value)  # the real columns are listed
    with pytest.raises(ValueError, match="'validation' maps to 'dev'"):
        m.from_dataset(dsd, splits={"train": "train", "validation": "dev", "test": "test"}, cfg=tiny_cfg(modality),
                       **m.dataset_columns(cols))
    if modality != "weather":  # weather may cut train alone into its chronological blocks
        with pytest.raises(ValueError, match="'test' split"):
            m.from_dataset(datasets.DatasetDict({"train": dsd["train"]}), cfg=tiny_cfg(modality),
                           **m.dataset_columns(cols))


@pytest.mark.parametrize("modality", ["audio", "image", "video"])
def test_an_undecodable_row_raises_instead_of_being_skipped(modality):
    m = modalities.get(modality)
    dsd = make_user_dataset(modality)
    column, feats = SPECS[modality][0], dsd["train"].features
    row = {c: [None] for c in feats} | {column: [{"bytes": b"not media at all", "path": "row0.bin"}], "kind": ["ping"]}
    broken = datasets.Dataset.from_dict(row).cast(feats)  # a cast, not an encode: encoding Audio needs torchcodec
    dsd["train"] = datasets.concatenate_datasets([broken, dsd["train"]])
    out = m.from_dataset(dsd, cfg=tiny_cfg(modality), **m.dataset_columns(columns_of(modality)))
    with pytest.raises(ValueError, match="row0.bin.*cannot decode"):
        out["train"][0]


@pytest.mark.parametrize("modality", [m for m in ALL if m != "weather"])
def test_a_test_label_train_lacks_is_refused(modality):
    m = modalities.get(modality)
    dsd = make_user_dataset(modality)
    test = dsd["test"].cast_column("kind", datasets.Value("string"))
    dsd["test"] = test.map(lambda y: {"kind": "buzz" if y == "hum" else y}, input_columns="kind")
    with pytest.raises(ValueError, match=r"\['buzz'\].*train does not have"):
        m.from_dataset(dsd, cfg=tiny_cfg(modality), **m.dataset_columns(columns_of(modality)))


def test_a_modality_without_input_field_says_so():
    from uniperc.modalities.base import Modality

    class Bare(Modality):
        name = "bare"

        def default_config(self):
            return {}

    with pytest.raises(ValueError, match="bare: takes no user dataset"):
        Bare().from_dataset(make_user_dataset("image"), "picture", "kind")


def test_weather_label_column_and_carved_validation():
    m = modalities.get("weather")
    dsd = make_user_dataset("weather", splits=("train", "test"))
    dsd = dsd.map(lambda t: {"warm": "yes" if t[0][0] > 281 else "no"}, input_columns="temp_2m")
    out = m.from_dataset(dsd, ["temp_2m", "humid"], label_column="warm", cfg={"history": 2, "horizon": 1})
    cfg = m.fitted_config(out)
    assert m.task_for(cfg) == "classification" and m.label_names(out) == ["no", "yes"]
    assert len(out["validation"]) >= 1 and cfg["split_fractions"][2] == pytest.approx(6 / 30)


def test_trainer_config_validates_the_dataset_keys(tmp_path):
    from uniperc.train import resolve

    def cfg(**section):
        c = compose(["image"], TINY, [f"output_dir={tmp_path / 'r'}"])
        c["modalities"]["image"].update({"source": "dataset", "path": str(tmp_path), **section})
        return c

    with pytest.raises(ValueError, match=r"modalities\.image\.columns"):
        resolve(cfg())
    with pytest.raises(ValueError, match=r"modalities\.image\.columns: unknown key\(s\) \['normals'\]"):
        resolve(cfg(columns={"inputs": "a", "label": "b", "normals": "n"}))
    with pytest.raises(ValueError, match=r"modalities\.image\.columns\.label"):
        resolve(cfg(columns={"inputs": "a"}))
    with pytest.raises(ValueError, match=r"modalities\.image\.splits has unknown key"):
        resolve(cfg(columns={"inputs": "a", "label": "b"}, splits={"training": "a"}))
    with pytest.raises(ValueError, match=r"modalities\.image\.data_files"):
        resolve(cfg(columns={"inputs": "a", "label": "b"}, data_files=3))
    c = cfg(columns={"inputs": "a", "label": "b"})
    c["modalities"]["image"]["source"] = "demo"
    with pytest.raises(ValueError, match=r"modalities\.image\.columns is only used with"):
        resolve(c)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ALL)
def test_train_on_saved_dataset_and_evaluate_on_its_parquet_copy(tmp_path, modality):
    """``source: dataset`` trains (from a saved DatasetDict, then from parquet files) and ``uniperc.evaluate``
    re-opens the training dataset, and the parquet copy by ``--path``."""
    import yaml

    from uniperc.evaluate import evaluate_checkpoint, main

    saved, parquet = save_both(modality, tmp_path)
    columns = yaml.safe_dump(columns_of(modality), default_flow_style=True).strip()
    out = tmp_path / "run"
    result = run(compose([modality], TINY, [f"output_dir={out}", f"modalities.{modality}.source=dataset",
                                            f"modalities.{modality}.path={saved}", "train.epochs=1",
                                            f"modalities.{modality}.columns={columns}"]))
    test = result["metrics"]["test"][modality]
    assert test and all(math.isfinite(v) for v in test.values())
    again = evaluate_checkpoint(out, split="test")[modality]
    assert again == pytest.approx(test, rel=1e-4, abs=1e-4)  # the same dataset, re-opened from the stored config
    main(["--checkpoint", str(out), "--source", "dataset", "--path", parquet, "--columns", columns,
          "--output", str(tmp_path / "ev")])
    assert (tmp_path / "ev" / f"eval_{modality}_test.json").is_file()
    from_parquet = run(compose([modality], TINY, [f"output_dir={tmp_path / 'pq'}", "train.epochs=1",
                                                  f"modalities.{modality}.source=dataset",
                                                  f"modalities.{modality}.path={parquet}",
                                                  f"modalities.{modality}.columns={columns}"]))
    assert all(math.isfinite(v) for v in from_parquet["metrics"]["test"][modality].values())
