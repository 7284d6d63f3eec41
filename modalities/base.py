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

TASKS = ("classification", "multilabel", "regression")
SOURCES = ("demo", "folder", "hub")
SPLITS = ("train", "validation", "test")
_CONFIG_KEY = "uniperc_config"
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

    def check_trainable(self, cfg: dict) -> None:
        """Raise ``ValueError`` for an adapter setting that is valid for the adapter but that the trainer
        cannot build a model for (the adapter can still feed a user's own model from Python). Called when
        the trainer reads its config, so such a run stops before any data is loaded; subclasses with such
        settings override it."""

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
        """
        cfg = self.config(cfg)
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
        for split in SPLITS:
            if split not in raw or len(raw[split]) == 0:
                raise ValueError(f"{self.name}: the {source} data has no (or an empty) {split!r} split")
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
            for col in spec.decode_off:
                ds = ds.cast_column(col, type(ds.features[col])(decode=False))
            out[split] = self.from_hub(ds, spec, cfg)
        return datasets.DatasetDict(out)

    def hub_spec(self, cfg: dict | None = None) -> HubSpec:
        """The Hub benchmark spec; ``ValueError`` if this modality names none."""
        if self.hub is None:
            raise ValueError(f"{self.name}: no Hugging Face Hub benchmark is defined")
        return self.hub

    def from_hub(self, ds, spec: HubSpec, cfg: dict):
        """Rename the Hub columns to the raw schema and cast to :meth:`raw_features`."""
        ds = ds.select_columns(list(spec.columns)).rename_columns(spec.columns)
        return ds.cast(self.raw_features(ds.features["label"].names if "label" in ds.features else None, cfg))

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
