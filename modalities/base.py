"""Shared machinery of every modality: config handling, the three data sources, transforms.

A modality file subclasses :class:`Modality` and fills in the hooks marked "subclass" below:

* ``example(raw, cfg, train)`` turns one *raw row* (what the ``datasets`` table stores: file bytes or
  arrays, never decoded media, so that neither torchcodec nor FFmpeg is needed) into
  ``(inputs FloatTensor[C', H, W], labels)``; train-time augmentation happens here when ``train``.
* ``load_folder(path, cfg, seed)`` builds the raw ``DatasetDict`` from the community's usual folder layout.
* ``make_demo(root, seed, **size_kw)`` writes the offline demo set *in that same folder layout*, so the
  demo source is "generate once, then load it as a folder" and exercises the real-file code path.
* ``raw_from_file(path, cfg)`` reads one file into a raw row (used by :meth:`read_file` / ``uniperc.predict``).
* ``hub`` names the real benchmark on the Hugging Face Hub and how its columns map onto the raw schema.
* ``input_field`` / ``optional_fields`` name the raw columns a user's own dataset maps its columns onto
  (``source="dataset"``, :meth:`Modality.from_dataset`); the Hub benchmark and a user's dataset go through
  the same :meth:`Modality.from_table`.

Transforms are attached with ``Dataset.set_transform`` so augmentation is drawn fresh on every access
(an on-disk ``map`` would freeze one augmentation per sample).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SOURCES = ("demo", "folder", "hub", "dataset")
SPLITS = ("train", "validation", "test")
_CONFIG_KEY = "uniperc_config"
VAL_FRACTION = 0.1  # share of train held out as validation when a user's dataset has no validation split
_DEMO_MARKER = "_uniperc_demo.json"


@dataclass(frozen=True)
class HubSpec:
    """Where the real benchmark lives on the Hugging Face Hub and how it maps onto our raw schema.

    ``columns`` maps Hub column -> raw column; ``splits`` maps our split -> Hub split expression;
    ``decode_off`` lists media columns to cast with ``decode=False`` so the bytes reach our own
    decoder (``datasets`` 4 would otherwise decode Audio/Video through torchcodec + FFmpeg).
    """

    name: str
    config: str | None
    columns: dict[str, str]
    splits: dict[str, str]
    num_classes: int | None = None
    decode_off: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def default_cache_dir(modality: str) -> Path:
    """``$UNIPERC_DATA/<modality>`` if the variable is set, else ``~/.cache/uniperc/<modality>``."""
    base = os.environ.get("UNIPERC_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "uniperc")
    return Path(base) / modality


class ExampleTransform:
    """Batch transform for ``Dataset.set_transform``: raw rows -> ``{"inputs", "labels"}`` tensors.

    A small class rather than a closure so that it pickles into DataLoader worker processes.
    """

    def __init__(self, modality: str, cfg: dict, train: bool):
        self.modality, self.cfg, self.train = modality, cfg, train

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        from . import get

        m = get(self.modality)
        n = len(next(iter(batch.values())))
        inputs, labels = [], []
        for i in range(n):
            x, y = m.example({k: v[i] for k, v in batch.items()}, self.cfg, self.train)
            inputs.append(x)
            labels.append(y)
        return {"inputs": inputs, "labels": labels}


class Modality:
    """Base class; see the module docstring for the hooks a modality implements."""

    name: str = ""
    task: str = "classification"
    hub: HubSpec | None = None
    file_extensions: tuple[str, ...] = ()
    demo_version: int = 1  # part of the demo cache key: bump it when make_demo's output changes

    # ----------------------------------------------------------------- config
    def default_config(self) -> dict:
        """The modality's settings (subclass). A fresh dict each call."""
        raise NotImplementedError

    def task_for(self, cfg: dict | None = None) -> str:
        """The task a config sets up (``task`` unless a modality's config can change it, as weather's can)."""
        return self.task

    def config(self, cfg: dict | None = None, **overrides) -> dict:
        """Defaults updated with ``cfg`` and ``overrides``; unknown keys raise ``ValueError``."""
        out = self.default_config()
        for source in (cfg or {}), overrides:
            unknown = sorted(set(source) - set(out))
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown config key(s) {unknown}; valid keys: {sorted(out)}"
                )
            out.update(copy.deepcopy(dict(source)))
        self.validate_config(out)
        return out

    def validate_config(self, cfg: dict) -> None:
        """Check value ranges (subclass may extend); raise ``ValueError`` naming the key."""

    # ----------------------------------------------------------------- model
    stems: tuple[str, ...] = ()  # the stems this modality supplies (modalities.<m>.stem), beside "backbone"

    def stem_for(self, cfg: dict) -> str:
        """What ``stem: auto`` builds for ``cfg``: ``"backbone"`` (the variant's own stem on the ``C'`` channels),
        unless the input is one that only a stem of the modality's own (:attr:`stems`) can read."""
        return "backbone"

    def check_stem(self, stem: str, cfg: dict, source: str) -> None:
        """Raise ``ValueError`` where ``stem`` (``"backbone"`` or one of :attr:`stems`) cannot read the inputs that
        ``cfg`` gives for data from ``source``. Called when the trainer reads its config and again with the
        fitted config once the data is open (weather only learns then whether it holds stations)."""

    def make_stem(self, stem: str, cfg: dict, backbone_stem: Callable[[int], "torch.nn.Module"]) -> "torch.nn.Module":
        """The module of one of :attr:`stems` for the fitted ``cfg``, ending at the backbone's stem width (stride 4);
        ``backbone_stem(c)`` builds the variant's own stem for ``c`` input channels, which it may end in (subclass
        with :attr:`stems`)."""
        raise NotImplementedError

    def views(self, cfg: dict) -> int | None:
        """Views per sample, where a sample is ``V x C' x H x W``: the model folds them into the batch and
        max-pools the pooled features over them (MVCNN); ``None`` (the default) where a sample is one image."""
        return None

    def field_shape(self, cfg: dict) -> tuple[int, int, int] | None:
        """``(C, H, W)`` when the regression target is a field on a grid (a dense head predicts it per pixel);
        ``None`` (the default) for class labels and scalar targets, which a pooled head predicts."""
        return None

    def persistence_channels(self, cfg: dict) -> list[int] | None:
        """Per target channel, the input channel that holds its last observed value (a forecast's persistence
        baseline and a dense head's residual); ``None`` (the default) where the input holds no such value."""
        return None

    def last_step(self, x: torch.Tensor, cfg: dict) -> torch.Tensor | None:
        """The persistence forecast of a batch of inputs ``B x C' x H x W``, in the flat target layout
        ``B x outputs``; ``None`` (the default) where the task has no persistence baseline."""
        return None

    def climatology(self, train, cfg: dict) -> torch.Tensor | None:
        """The mean of every normalised target value over the ``train`` split, ``1 x outputs`` (the climatology
        baseline), where the modality can compute it without reading every sample; ``None`` (the default): the
        baseline averages the split's samples itself."""
        return None

    def in_chans(self, cfg: dict | None = None) -> int:
        """C' of the adapter output for ``cfg`` (subclass)."""
        raise NotImplementedError

    def input_size(self, cfg: dict | None = None) -> tuple[int, int]:
        """(H, W) of the adapter output for ``cfg`` (subclass)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- loading
    def load(
        self,
        source: str = "demo",
        path: str | os.PathLike | None = None,
        cfg: dict | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        **kw,
    ):
        """Load ``source`` as a ``datasets.DatasetDict`` (train/validation/test) with transforms attached.

        ``demo``: generate the offline demo set under ``cache_dir`` (default :func:`default_cache_dir`)
        unless it is already there, then load it; ``kw`` are the demo size knobs of :meth:`make_demo`.
        ``folder``: real files at ``path`` in the community layout; ``kw`` go to :meth:`load_folder`.
        ``hub``: the benchmark named by :attr:`hub` (needs network); ``kw`` go to ``load_dataset``.
        ``dataset``: a user's own dataset at ``path``; ``kw`` are ``name`` / ``data_files`` / ``columns`` /
        ``splits`` of :meth:`load_user_dataset`.
        """
        cfg = self.config(cfg)
        if source == "dataset":
            return self.load_user_dataset(path, cfg, seed=seed, cache_dir=cache_dir, **kw)
        if source == "demo":
            root = self.ensure_demo(cache_dir=cache_dir, seed=seed, **kw)
            raw = self.load_folder(root, cfg, seed=seed)
        elif source == "folder":
            if path is None:
                raise ValueError(f"{self.name}: source='folder' needs path= (a folder of real files)")
            if not Path(path).is_dir():
                raise ValueError(f"{self.name}: folder path {str(path)!r} does not exist or is not a folder")
            raw = self.load_folder(Path(path), cfg, seed=seed, **kw)
        elif source == "hub":
            raw = self.load_hub(cfg, cache_dir=cache_dir, **kw)
        else:
            raise ValueError(f"{self.name}: unknown source {source!r}; expected one of {SOURCES}")
        return self._finish(raw, cfg, source)

    def _finish(self, raw, cfg: dict, source: str):
        """Every split present and non-empty, statistics fitted on train, transforms attached."""
        for split in SPLITS:
            if split not in raw or len(raw[split]) == 0:
                raise ValueError(f"{self.name}: the data of source {source!r} has no (or an empty) {split!r} split")
        cfg = self.fit_config(raw, cfg)
        return self.attach(raw, cfg)

    def ensure_demo(self, cache_dir=None, seed: int = 0, **size_kw) -> Path:
        """Path of the demo set for (seed, size knobs), generating it first if it is not cached.

        Generation goes to a temporary sibling folder that is renamed into place when complete, so an
        interrupted run or two concurrent processes never leave a half-written set that looks cached.
        """
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.name)
        key = json.dumps({"modality": self.name, "version": self.demo_version, "seed": seed, **size_kw},
                         sort_keys=True, default=str)
        # the modality is in the name too, so one cache_dir can hold every modality's demo sets
        root = base / f"{self.name}-demo-s{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        if (root / _DEMO_MARKER).exists():
            return root
        tmp = base / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.make_demo(tmp, seed=seed, **size_kw)
        (tmp / _DEMO_MARKER).write_text(key)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not (root / _DEMO_MARKER).exists():
                raise
        return root

    def make_demo(self, root, seed: int = 0, **size_kw):
        """Write the offline demo set into ``root`` (deterministic from ``seed``); returns ``root`` (subclass)."""
        raise NotImplementedError

    def load_folder(self, path: Path, cfg: dict, seed: int = 0, **kw):
        """Raw ``DatasetDict`` from a folder in the community layout (subclass)."""
        raise NotImplementedError

    def load_hub(self, cfg: dict, cache_dir=None, **kw):
        """Download :attr:`hub` with ``datasets.load_dataset`` and map it onto the raw schema."""
        import datasets

        spec = self.hub_spec(cfg)
        out = {}
        for split, hub_split in spec.splits.items():
            ds = datasets.load_dataset(spec.name, spec.config, split=hub_split, cache_dir=cache_dir, **kw)
            out[split] = self.from_hub(ds, spec, cfg)
        return datasets.DatasetDict(out)

    def hub_spec(self, cfg: dict | None = None) -> HubSpec:
        """The Hub benchmark spec; ``ValueError`` if this modality names none."""
        if self.hub is None:
            raise ValueError(f"{self.name}: no Hugging Face Hub benchmark is defined")
        return self.hub

    def from_hub(self, ds, spec: HubSpec, cfg: dict):
        """One split of the Hub benchmark -> raw rows; a benchmark with quirks (audio's ``_silence_`` rows,
        video's frame table) overrides this and still ends in :meth:`from_table`."""
        return self.from_table(ds, spec, cfg)

    def from_table(self, ds, spec: HubSpec, cfg: dict, label_names: list[str] | None = None):
        """Any table -> raw rows, shared by the Hub and a user's dataset: ``spec.columns`` (table -> raw
        column) are selected and renamed, the ``spec.decode_off`` media columns cast to ``decode=False`` (their
        bytes reach our own decoders, never torchcodec), raw columns the table lacks are null, and the result
        is cast to :meth:`raw_features` (class names: ``label_names``, else the table's ``ClassLabel``)."""
        ds = self.rename_table(ds, spec)
        if label_names is None and "label" in ds.features:
            label_names = ds.features["label"].names
        feats = self.raw_features(label_names, cfg)
        for col in feats:
            if col not in ds.column_names:
                ds = ds.add_column(col, [None] * len(ds))
        return ds.cast(feats)

    def rename_table(self, ds, spec: HubSpec):
        """``spec.columns`` selected and renamed to raw columns, media in ``spec.decode_off`` left encoded;
        ``ValueError`` listing the table's real columns when one is missing."""
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise ValueError(f"{self.name}: {spec.name or 'the dataset'} has no column(s) {missing}; "
                             f"its columns are {ds.column_names}")
        for col in spec.decode_off:
            ds = ds.cast_column(col, undecoded(ds.features[col]))
        return ds.select_columns(list(spec.columns)).rename_columns(spec.columns)

    # ----------------------------------------------------------------- a user's own dataset
    input_field: str = ""  # the raw column a user's input column becomes (subclass); "" = no user datasets
    input_media: str | None = None  # "Audio" / "Image" / "Video": an input column of file paths or bytes is read as one
    optional_fields: tuple[str, ...] = ()  # raw columns a user's dataset may also map (audio's speaker, ...)
    needs_label: bool = True  # False where the target can come from the inputs (weather's forecasts)

    def dataset_columns(self, columns: dict | None) -> dict:
        """A config's ``columns:`` mapping (``inputs``, ``label``, :attr:`optional_fields`) -> the keyword
        arguments of :meth:`from_dataset`; ``ValueError`` naming the bad key."""
        columns = dict(columns or {})
        allowed = ("inputs", "label", *self.optional_fields)
        unknown = sorted(set(columns) - set(allowed))
        if unknown:
            raise ValueError(f"columns: unknown key(s) {unknown}; {self.name} takes {list(allowed)}")
        inputs = columns.pop("inputs", None)
        if not (isinstance(inputs, str) and inputs) and not (
                isinstance(inputs, list) and inputs and all(isinstance(c, str) for c in inputs)):
            raise ValueError(f"columns.inputs must name the input column (or a list of them), got {inputs!r}")
        for key, value in columns.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"columns.{key} must be a column name, got {value!r}")
        if self.needs_label and not columns.get("label"):
            raise ValueError(f"columns.label must name the label column ({self.name} classifies)")
        return {"input_column": inputs, "label_column": columns.pop("label", None), **columns}

    def load_user_dataset(self, path, cfg: dict | None = None, seed: int = 0, cache_dir=None, name=None,
                          data_files=None, columns: dict | None = None, splits: dict | None = None):
        """``source="dataset"``: open the dataset (:func:`open_dataset`), then map it with :meth:`from_dataset`."""
        kwargs = self.dataset_columns(columns)
        return self.from_dataset(open_dataset(path, name, data_files, cache_dir), splits=splits, cfg=cfg,
                                 seed=seed, **kwargs)

    def from_dataset(self, dsd, input_column, label_column=None, splits: dict | None = None,
                     cfg: dict | None = None, seed: int = 0, **columns):
        """A user's own ``datasets.DatasetDict`` -> the same attached DatasetDict as :meth:`load`.

        ``input_column`` / ``label_column`` name the dataset's columns; ``columns`` maps the modality's
        :attr:`optional_fields` to columns too. ``splits`` maps train / validation / test (and extra
        ``test_<name>`` splits) to the dataset's split names (default: the same names, or val / valid /
        dev for validation); without a validation split, :func:`carve_validation` holds one out of train.
        Labels that are not a ``ClassLabel`` become one: the sorted values of train, the same for every
        split; a label another split has but train lacks raises ``ValueError``.
        """
        import datasets

        if not self.input_field:
            raise ValueError(f"{self.name}: takes no user dataset yet (the modality sets no input_field)")
        cfg = self.config(cfg)
        chosen = select_splits(dsd, splits, self.name)
        inputs = [input_column] if isinstance(input_column, str) else list(input_column)
        if len(inputs) != 1:
            raise ValueError(f"{self.name}: takes one input column, got {inputs}")
        if label_column is None:
            raise ValueError(f"{self.name}: from_dataset needs label_column= (columns.label)")
        unknown = sorted(set(columns) - set(self.optional_fields))
        if unknown:
            raise ValueError(f"{self.name}: unknown column role(s) {unknown}; optional ones are {list(self.optional_fields)}")
        chosen, names = encode_labels(chosen, label_column, self.name)
        feats = chosen["train"].features
        if inputs[0] not in feats:  # before input_field_for reads its feature
            raise ValueError(f"{self.name}: the dataset has no column {inputs[0]!r}; its columns are {list(feats)}")
        if self.input_media and feats[inputs[0]] in (datasets.Value("string"), datasets.Value("binary")):
            media = getattr(datasets, self.input_media)(decode=False)  # paths / bytes -> {"bytes", "path"}
            chosen = {s: ds.cast_column(inputs[0], media) for s, ds in chosen.items()}
            feats = chosen["train"].features
        mapping = {inputs[0]: self.input_field_for(feats[inputs[0]]), label_column: "label",
                   **{col: raw for raw, col in columns.items() if col is not None}}
        spec = HubSpec(name="the dataset", config=None, columns=mapping, splits={},
                       decode_off=tuple(c for c in mapping if undecoded(feats.get(c)) != feats.get(c)))
        raw = {split: self.from_table(ds, spec, cfg, names) for split, ds in chosen.items()}
        if "validation" not in raw:
            raw["train"], raw["validation"] = carve_validation(raw["train"], cfg.get("val_fraction", VAL_FRACTION), seed)
        return self._finish(datasets.DatasetDict(raw), cfg, "dataset")

    def input_field_for(self, feature) -> str:
        """The raw column the user's input column (of ``feature`` type) becomes; video picks by type."""
        return self.input_field

    def raw_features(self, label_names: list[str] | None, cfg: dict):
        """The explicit ``datasets.Features`` of the raw rows (subclass)."""
        raise NotImplementedError

    def fit_config(self, raw, cfg: dict) -> dict:
        """Derive data-dependent settings (e.g. normalisation statistics) from the *train* split only.

        The default has none. The result is what :meth:`fitted_config` later returns.
        """
        return cfg

    def attach(self, raw, cfg: dict):
        """Attach the transforms (train augmentation on ``train`` only) and record ``cfg`` in the splits."""
        import datasets

        out = datasets.DatasetDict()
        for split, ds in raw.items():
            ds.info.description = json.dumps({_CONFIG_KEY: cfg, "modality": self.name})
            out[split] = ds.with_transform(ExampleTransform(self.name, cfg, train=split == "train"))
        return out

    def fitted_config(self, dsd) -> dict:
        """The config (including fitted statistics) a loaded ``DatasetDict`` or ``Dataset`` was built with.

        Save it with a checkpoint: :meth:`adapter` and :meth:`read_file` need it at prediction time.
        """
        ds = dsd["train"] if hasattr(dsd, "keys") else dsd
        try:
            return json.loads(ds.info.description)[_CONFIG_KEY]
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"{self.name}: this dataset was not built by "
                             f"uniperc.modalities.{self.name}.load") from None

    # ----------------------------------------------------------------- labels
    def label_names(self, dsd) -> list[str]:
        """Class names (classification / multilabel) from the ``label`` feature."""
        ds = dsd["train"] if hasattr(dsd, "keys") else dsd
        feat = ds.features["label"]
        feat = getattr(feat, "feature", feat)  # Sequence(ClassLabel) for multilabel
        return list(feat.names)

    def num_outputs(self, dsd) -> int:
        """Head size: number of classes, or of regression targets."""
        return len(self.label_names(dsd))

    # ----------------------------------------------------------------- adapter
    def example(self, raw: dict, cfg: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One raw row -> ``(inputs, labels)``; default: :meth:`adapter` plus a long class label."""
        return self.to_input(raw, cfg, train), torch.tensor(int(raw["label"]), dtype=torch.long)

    def to_input(self, raw: dict, cfg: dict, train: bool) -> torch.Tensor:
        """One raw row -> ``FloatTensor[C', H, W]`` (subclass)."""
        raise NotImplementedError

    def adapter(self, cfg: dict | None = None, train: bool = False) -> Callable[[dict], torch.Tensor]:
        """Callable mapping one raw row dict to ``FloatTensor[C', H, W]`` (augmented when ``train``)."""
        cfg = self.config(cfg)
        return lambda raw: self.to_input(raw, cfg, train)

    def raw_from_file(self, path: Path, cfg: dict) -> dict:
        """Read one file into a raw row (subclass)."""
        raise NotImplementedError

    def read_file(self, path, cfg: dict | None = None) -> torch.Tensor:
        """A raw file -> adapter input tensor ``C'xHxW`` (no augmentation), e.g. for ``uniperc.predict``."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{self.name}: file {str(path)!r} does not exist")
        if self.file_extensions and not _has_suffix(path, self.file_extensions):
            raise ValueError(
                f"{self.name}: file {str(path)!r} has an unsupported extension; "
                f"expected one of {self.file_extensions}"
            )
        cfg = self.config(cfg)
        return self.to_input(self.raw_from_file(path, cfg), cfg, train=False)


def undecoded(feature):
    """``Audio`` / ``Image`` / ``Video`` (or a list of them) with ``decode=False``; other features unchanged."""
    import datasets

    media = (datasets.Audio, datasets.Image, datasets.Video)
    if isinstance(feature, media):
        return type(feature)(decode=False)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.List) and isinstance(inner, media):
        return datasets.List(type(inner)(decode=False))
    return feature


def open_dataset(path, name: str | None = None, data_files=None, cache_dir=None):
    """A user's dataset as a ``DatasetDict``, all through the ``datasets`` library.

    ``path`` is a ``save_to_disk`` folder (``load_from_disk``), a folder of parquet / arrow files (split names
    inferred from the file names, e.g. ``train-0.parquet``, ``test.parquet``), a parquet / arrow file or glob,
    or anything else ``load_dataset`` takes (a Hub name or a builder such as ``"csv"``, with ``name`` /
    ``data_files``). A saved single ``Dataset`` is taken as the train split.
    """
    import datasets

    if path is None:
        raise ValueError("source 'dataset' needs path= (a save_to_disk folder, parquet/arrow files or a dataset name)")
    path_s, p = str(path), Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        dsd = datasets.load_from_disk(path_s)
        return datasets.DatasetDict({"train": dsd}) if isinstance(dsd, datasets.Dataset) else dsd
    if p.is_dir():
        found = {f.suffix for f in p.rglob("*")} & {".parquet", ".arrow"}
        if not found:
            raise ValueError(f"dataset folder {path_s!r} holds neither a save_to_disk dataset nor parquet/arrow files")
        fmt = "parquet" if ".parquet" in found else "arrow"
        return datasets.load_dataset(fmt, data_dir=path_s, data_files=data_files, cache_dir=cache_dir)
    if any(ch in path_s for ch in "*?[") or p.suffix in (".parquet", ".arrow"):
        if data_files is not None:
            raise ValueError(f"dataset path {path_s!r} names files already; give data_files with a folder path")
        fmt = "arrow" if path_s.endswith(".arrow") else "parquet"
        return datasets.load_dataset(fmt, data_files=path_s, cache_dir=cache_dir)
    return datasets.load_dataset(path_s, name, data_files=data_files, cache_dir=cache_dir)


_VALIDATION_ALIASES = ("validation", "val", "valid", "dev")


def select_splits(dsd, splits: dict | None, what: str) -> dict:
    """``{our split: Dataset}`` from ``splits`` (our name -> the dataset's; default: same names, validation
    also as val / valid / dev); ``ValueError`` naming a split that is missing."""
    import datasets

    if isinstance(dsd, datasets.Dataset):
        dsd = {"train": dsd}
    have = list(dsd)
    if splits is None:
        splits = {s: s for s in have if s in SPLITS or s.startswith("test_")}
        alias = next((a for a in _VALIDATION_ALIASES if a in have), None)
        if alias:
            splits["validation"] = alias
    bad = sorted(k for k in splits if k not in SPLITS and not str(k).startswith("test_"))
    if bad:
        raise ValueError(f"{what}: splits has unknown key(s) {bad}; keys are {list(SPLITS)} or test_<name>")
    for ours, theirs in splits.items():
        if theirs not in have:
            raise ValueError(f"{what}: split {ours!r} maps to {theirs!r}, which the dataset does not have; "
                             f"its splits are {have}")
    if "train" not in splits:
        raise ValueError(f"{what}: the dataset has no 'train' split (its splits are {have}); map one with splits=")
    return {ours: dsd[theirs] for ours, theirs in splits.items()}


def encode_labels(chosen: dict, column: str, what: str) -> tuple[dict, list[str]]:
    """Every split's ``column`` as one ``ClassLabel``: a ``ClassLabel`` of train keeps its names, other values
    become the sorted values of train; ``ValueError`` for a missing column or a label train does not have."""
    import datasets

    for split, ds in chosen.items():
        if column not in ds.column_names:
            raise ValueError(f"{what}: split {split!r} has no label column {column!r}; its columns are {ds.column_names}")
    feat = chosen["train"].features[column]
    if isinstance(feat, datasets.ClassLabel):
        names = list(feat.names)
    else:
        values = chosen["train"].unique(column)
        if None in values:
            raise ValueError(f"{what}: label column {column!r} of split 'train' has missing (null) labels")
        names = [str(v) for v in sorted(values)]
    out = {}
    for split, ds in chosen.items():
        f = ds.features[column]
        if isinstance(f, datasets.ClassLabel) and list(f.names) == names:
            out[split] = ds
            continue
        if isinstance(f, datasets.ClassLabel):  # back to names, re-encoded with train's names below
            feats = ds.features.copy()
            feats[column] = datasets.Value("string")
            ds = ds.map(lambda y: {column: f.int2str(y)}, input_columns=column, batched=True, features=feats)
        elif f != datasets.Value("string"):
            ds = ds.cast_column(column, datasets.Value("string"))
        unknown = sorted({str(v) for v in ds.unique(column)} - set(names))
        if unknown:
            raise ValueError(f"{what}: split {split!r} has label(s) {unknown} in column {column!r} that train "
                             f"does not have (train's labels: {names})")
        out[split] = ds.cast_column(column, datasets.ClassLabel(names=names))
    return out, names


def carve_validation(train, fraction: float, seed: int):
    """``(train, validation)``: the ``max(1, round(fraction * n))`` rows whose row index has the smallest
    seeded SHA-1 hash become validation, so the hold-out is stable across runs and machines and never empty."""
    rank = sorted(range(len(train)), key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    held = set(rank[: max(1, round(fraction * len(train)))])
    return (train.select([i for i in range(len(train)) if i not in held]),
            train.select(sorted(held)))


def _has_suffix(path: Path, suffixes) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ``ValueError`` naming ``what`` if ``x`` has NaN/inf (nothing is skipped silently)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: contains {bad} non-finite value(s) (NaN or inf)")
    return x


def split_by_key(keys: list[str], fractions: tuple[float, float], seed: int) -> list[str]:
    """Assign each key (speaker, video group, file stem...) to train/validation/test by a stable hash.

    Hashing the *key* (not the row) keeps all rows of one speaker/group in one split, and stays stable
    when files are added — the rule Speech Commands uses for its official split.
    """
    val_frac, test_frac = fractions
    out = []
    for k in keys:
        h = int(hashlib.sha1(f"{seed}:{k}".encode()).hexdigest(), 16) % 10_000 / 10_000
        out.append("validation" if h < val_frac else "test" if h < val_frac + test_frac else "train")
    return out
