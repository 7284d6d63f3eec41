"""Training configuration: YAML files, command-line overrides, defaults and validation.

A run is described by one nested dict (plain values, nanoGPT style) with four sections:

``seed``, ``output_dir``
``modalities``: ``{name: {source, path, name, data_files, columns, splits, config, demo, batch_size,
eval_batch_size, label_smoothing, mixup, loss_weight, repeat, head, residual, stem}}`` (``name`` .. ``splits``: ``source: dataset``)
``model``:      ``{backbone, mixer, kwargs, drop_path_rate, drop_rate}``
``train``:      optimisation, precision, checkpointing, logging (see :data:`DEFAULTS`).

:func:`resolve` fills the defaults and validates every value *before* anything is built, raising
``ValueError`` that names the offending key (e.g. ``train.lr``). Overrides use dotted keys with YAML values:
``--set train.lr=1e-3 --set model.kwargs.dims=[8,16,32,64]`` (:func:`apply_overrides`).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..heads import HEADS
from ..tasks import get_task


def _config_dir() -> Path:
    """The shipped YAML configs, wherever uniperc is imported from: ``uniperc/configs`` in an installed wheel,
    else (a checkout, on PYTHONPATH or installed editable) the repository's top-level ``configs/``."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()

MODALITY_DEFAULTS: dict[str, Any] = {
    "source": "demo",          # demo | folder | hub | dataset (uniperc.modalities.<name>.load)
    "path": None,              # folder of real files (folder); save_to_disk folder / parquet files / name (dataset)
    "name": None,              # source=dataset: the load_dataset configuration name
    "data_files": None,        # source=dataset: load_dataset data_files (a path, glob, list or {split: files})
    "columns": None,           # source=dataset: {inputs, label, + the modality's optional columns}
    "splits": None,            # source=dataset: {train|validation|test: the dataset's split}; None = same names
    "config": None,            # adapter settings; None = the modality's demo_config() for demo data, else defaults
    "demo": {},                # demo-set size knobs (uniperc.modalities.<name>.make_demo keyword arguments)
    "batch_size": 32,          # per process
    "eval_batch_size": None,   # None = 2 x batch_size
    "label_smoothing": 0.1,    # classification heads only
    "mixup": 0.0,              # mixup's Beta(a, a) in training, a > 0 (tasks with supports_mixup); 0 = off
    "loss_weight": 1.0,        # multiplies this task's loss in joint training
    "repeat": 1,               # passes over this modality's training split per epoch (joint: one that needs more steps)
    "head": "auto",            # auto | pooled | dense; auto = dense when the modality's target is a field (weather)
    "residual": None,          # dense head adds the last input step: None = where the modality gives one
    "stem": "auto",            # auto | backbone | a stem the modality supplies (its `stems`); auto = its own choice
}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    "modalities": {},
    "model": {
        "backbone": "unireplknet_a",
        "mixer": None,          # None = the variant's own mixer; a name swaps only the spatial mixer in its blocks
        "kwargs": {},           # any UniPercNet argument, e.g. dims, depths, kernel_sizes, mixer_kwargs
        "drop_path_rate": 0.0,
        "drop_rate": 0.0,
    },
    "train": {
        "epochs": 10,
        "max_steps": None,           # stop after this many batches in total (tests, smoke runs)
        "lr": 1e-3,                  # peak learning rate (AdamW), reached after warmup
        "min_lr": 1e-6,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_steps": None,        # optimizer updates; None = warmup_epochs worth of updates
        "warmup_epochs": 1.0,
        "grad_accum": 1,
        "clip_grad": None,           # max global grad norm, None = off
        "mixed_precision": "no",     # no | bf16 | fp16 (fp16 needs a GPU)
        "cpu": False,                # force CPU even when a GPU is present
        "ema": {"enabled": False, "decay": 0.999, "warmup": True},
        "interleave": "proportional",  # round_robin | proportional (joint training batch order)
        "num_workers": 0,
        "checkpoint_every": 200,     # batches; a checkpoint is also written at the end of every epoch
        "keep_checkpoints": 2,
        "eval_every": 1,             # epochs between validation passes
        "log_every": 10,             # batches between logged training losses
        "trackers": ["tensorboard", "csv"],
        "progress": True,            # tqdm bar on the main process
        "threads": None,             # torch.set_num_threads; None = leave torch's default
    },
}

_MIXED = ("no", "bf16", "fp16")
_INTERLEAVE = ("round_robin", "proportional")
_SOURCES = ("demo", "folder", "hub", "dataset")
_TRACKERS = ("tensorboard", "csv")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; read it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_value(text: str):
    """A command-line / config value: YAML syntax, with ``1e-3`` read as a number."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict:
    """A config file as a dict; ``ValueError`` if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    data = parse_value(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge (``update`` wins); returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("config", "demo", "kwargs"):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply ``"a.b.c=value"`` strings (value parsed as YAML) to a copy of ``config``."""
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key part")
        node = out
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = parse_value(raw)
    return out


def compose(modalities: list[str] | None = None, config_path: str | None = None,
            overrides: Iterable[str] = ()) -> dict:
    """The raw config a command line asks for (before :func:`resolve`).

    * ``config_path`` given: that file; ``modalities`` (if given) selects which of its modalities train.
    * one modality: ``configs/<modality>.yaml``.
    * several: ``configs/multitask.yaml`` for model/train settings; each modality's section comes from
      ``multitask.yaml`` when it has one, else from ``configs/<modality>.yaml``.
    """
    if config_path is not None:
        config = load_yaml(config_path)
        if modalities:
            have = config.get("modalities") or {}
            config["modalities"] = {m: have.get(m) or _modality_section(m) for m in modalities}
    elif not modalities:
        raise ValueError("give --modality and/or --config")
    elif len(modalities) == 1:
        config = load_yaml(CONFIG_DIR / f"{modalities[0]}.yaml")
    else:
        config = load_yaml(CONFIG_DIR / "multitask.yaml")
        have = config.get("modalities") or {}
        config["modalities"] = {m: have.get(m) or _modality_section(m) for m in modalities}
    return apply_overrides(config, overrides)


def _modality_section(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        return {}
    return (load_yaml(path).get("modalities") or {}).get(name) or {}


def _check_keys(given: dict, allowed: dict, prefix: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"valid keys under {prefix.rstrip('.') or 'the top level'}: {sorted(allowed)}")


def _number(cfg: dict, key: str, name: str, low=None, high=None, integer=False, low_open=False,
            allow_none=False):
    value = cfg[key]
    if value is None and allow_none:
        return
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def resolve(config: dict) -> dict:
    """Defaults filled in and every value checked; raises ``ValueError`` naming the bad key.

    Modality adapter settings are checked by the modality itself (``uniperc.modalities.get(m).config``), also here,
    so a typo in ``modalities.audio.config`` fails before any data is generated or model built.
    """
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    _check_keys(config, DEFAULTS, "")
    cfg = merge(DEFAULTS, {k: v for k, v in config.items() if k != "modalities"})
    for section in ("model", "train"):
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"{section} must be a mapping")
        _check_keys(config.get(section, {}), DEFAULTS[section], f"{section}.")
    _check_keys(cfg["train"]["ema"], DEFAULTS["train"]["ema"], "train.ema.")
    _number(cfg, "seed", "seed", 0, integer=True)
    if not cfg["output_dir"] or not isinstance(cfg["output_dir"], (str, Path)):
        raise ValueError(f"output_dir must be a non-empty path, got {cfg['output_dir']!r}")
    cfg["output_dir"] = str(cfg["output_dir"])

    mods = config.get("modalities") or {}
    if not isinstance(mods, dict) or not mods:
        raise ValueError("modalities must map at least one modality name to its settings")
    import uniperc.modalities as modality_registry

    cfg["modalities"] = {}
    for name, section in mods.items():
        prefix = f"modalities.{name}."
        try:
            m = modality_registry.get(name)
        except ValueError as e:
            raise ValueError(f"modalities.{name}: {e}") from None
        section = section or {}
        if not isinstance(section, dict):
            raise ValueError(f"modalities.{name} must be a mapping")
        _check_keys(section, MODALITY_DEFAULTS, prefix)
        s = merge(MODALITY_DEFAULTS, section)
        if s["source"] not in _SOURCES:
            raise ValueError(f"{prefix}source must be one of {_SOURCES}, got {s['source']!r}")
        if s["source"] in ("folder", "dataset") and not s["path"]:
            raise ValueError(f"{prefix}path is required when {prefix}source is {s['source']!r}")
        _check_dataset_keys(m, s, prefix)
        _number(s, "batch_size", prefix + "batch_size", 1, integer=True)
        _number(s, "eval_batch_size", prefix + "eval_batch_size", 1, integer=True, allow_none=True)
        _number(s, "label_smoothing", prefix + "label_smoothing", 0.0, 0.99)
        _number(s, "mixup", prefix + "mixup", 0.0, 10.0)
        _number(s, "loss_weight", prefix + "loss_weight", 0.0, low_open=True)
        _number(s, "repeat", prefix + "repeat", 1, integer=True)
        if s["head"] not in ("auto", *HEADS):
            raise ValueError(f"{prefix}head must be one of {('auto', *HEADS)}, got {s['head']!r}")
        if s["residual"] not in (None, True, False):
            raise ValueError(f"{prefix}residual must be true, false or null, got {s['residual']!r}")
        for key in ("config", "demo"):
            if s[key] is not None and not isinstance(s[key], dict):
                raise ValueError(f"{prefix}{key} must be a mapping, got {s[key]!r}")
        try:
            s["config"] = _adapter_config(m, s)
        except ValueError as e:
            raise ValueError(f"{prefix}config: {e}") from None
        _check_stem(m, s, prefix)
        task = get_task(m.task_for(s["config"]))
        if s["mixup"] and not task.supports_mixup:
            raise ValueError(f"{prefix}mixup: this {name} task ({task.name}) does not support mixup (its loss is not "
                             f"the loss of a blended target); set it to 0")
        if s["head"] != "auto" and s["head"] not in task.heads:
            raise ValueError(f"{prefix}head: {s['head']!r} cannot predict this {name} task ({task.name}); "
                             f"it takes {list(task.heads)} (or 'auto')")
        cfg["modalities"][name] = s

    model = cfg["model"]
    if not isinstance(model["backbone"], str) or not model["backbone"]:
        raise ValueError(f"model.backbone must be a timm model name, got {model['backbone']!r}")
    import timm

    import uniperc  # noqa: F401  (registers the variants)

    if model["backbone"] not in timm.list_models():
        raise ValueError(f"model.backbone {model['backbone']!r} is not a registered timm model; uniperc variants: "
                         f"{_uniperc_models()}")
    if model["mixer"] is not None:
        from uniperc.blocks import get_mixer

        try:
            get_mixer(model["mixer"]) if isinstance(model["mixer"], str) else None
        except (KeyError, ValueError) as e:
            raise ValueError(f"model.mixer: {e}") from None
    if not isinstance(model["kwargs"], dict):
        raise ValueError(f"model.kwargs must be a mapping, got {model['kwargs']!r}")
    _number(model, "drop_path_rate", "model.drop_path_rate", 0.0, 1.0)
    _number(model, "drop_rate", "model.drop_rate", 0.0, 1.0)
    _check_backbone_builds(model, cfg["modalities"])

    t = cfg["train"]
    _number(t, "epochs", "train.epochs", 1, integer=True)
    _number(t, "max_steps", "train.max_steps", 1, integer=True, allow_none=True)
    _number(t, "lr", "train.lr", 0.0, low_open=True)
    _number(t, "min_lr", "train.min_lr", 0.0)
    if t["min_lr"] > t["lr"]:
        raise ValueError(f"train.min_lr ({t['min_lr']}) must not exceed train.lr ({t['lr']})")
    _number(t, "weight_decay", "train.weight_decay", 0.0)
    if (not isinstance(t["betas"], (list, tuple)) or len(t["betas"]) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t["betas"])):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {t['betas']!r}")
    _number(t, "warmup_steps", "train.warmup_steps", 0, integer=True, allow_none=True)
    _number(t, "warmup_epochs", "train.warmup_epochs", 0.0)
    _number(t, "grad_accum", "train.grad_accum", 1, integer=True)
    _number(t, "clip_grad", "train.clip_grad", 0.0, low_open=True, allow_none=True)
    if t["mixed_precision"] not in _MIXED:
        raise ValueError(f"train.mixed_precision must be one of {_MIXED}, got {t['mixed_precision']!r}")
    if not isinstance(t["cpu"], bool):
        raise ValueError(f"train.cpu must be true or false, got {t['cpu']!r}")
    if not isinstance(t["ema"]["enabled"], bool):
        raise ValueError(f"train.ema.enabled must be true or false, got {t['ema']['enabled']!r}")
    _number(t["ema"], "decay", "train.ema.decay", 0.0, 1.0)
    if t["interleave"] not in _INTERLEAVE:
        raise ValueError(f"train.interleave must be one of {_INTERLEAVE}, got {t['interleave']!r}")
    _number(t, "num_workers", "train.num_workers", 0, integer=True)
    _number(t, "checkpoint_every", "train.checkpoint_every", 1, integer=True)
    _number(t, "keep_checkpoints", "train.keep_checkpoints", 1, integer=True)
    _number(t, "eval_every", "train.eval_every", 1, integer=True)
    _number(t, "log_every", "train.log_every", 1, integer=True)
    _number(t, "threads", "train.threads", 1, integer=True, allow_none=True)
    trackers = t["trackers"] or []
    if not isinstance(trackers, list) or any(x not in _TRACKERS for x in trackers):
        raise ValueError(f"train.trackers must be a list drawn from {_TRACKERS}, got {t['trackers']!r}")
    return cfg


def _check_dataset_keys(m, s: dict, prefix: str) -> None:
    """``name`` / ``data_files`` / ``columns`` / ``splits`` belong to ``source: dataset``, which needs ``columns``."""
    from ..data import DATASET_KEYS

    if s["source"] != "dataset":
        given = [k for k in DATASET_KEYS if s[k] is not None]
        if given:
            raise ValueError(f"{prefix}{given[0]} is only used with {prefix}source 'dataset' (source is {s['source']!r})")
        return
    if s["name"] is not None and not isinstance(s["name"], str):
        raise ValueError(f"{prefix}name must be a string, got {s['name']!r}")
    files = s["data_files"]
    if files is not None and not isinstance(files, (str, list, dict)):
        raise ValueError(f"{prefix}data_files must be a path, a list of paths or a {{split: paths}} mapping, got {files!r}")
    if not isinstance(s["columns"], dict):
        raise ValueError(f"{prefix}columns must be a mapping such as {{inputs: <column>, label: <column>}}, "
                         f"got {s['columns']!r}")
    try:
        m.dataset_columns(s["columns"])
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
    splits = s["splits"]
    if splits is not None:
        if not isinstance(splits, dict) or not all(isinstance(v, str) for v in splits.values()):
            raise ValueError(f"{prefix}splits must map train / validation / test to split names, got {splits!r}")
        bad = sorted(k for k in splits if k not in ("train", "validation", "test") and not str(k).startswith("test_"))
        if bad:
            raise ValueError(f"{prefix}splits has unknown key(s) {bad}; keys are train, validation, test or test_<name>")


def _check_stem(m, s: dict, prefix: str) -> None:
    """``stem`` is ``auto``, ``backbone`` or one of the modality's own stems, and can read what its config gives."""
    import uniperc.modalities as modality_registry

    choices = ("auto", "backbone", *m.stems)
    stem = s["stem"]
    if stem not in choices:
        owners = [n for n in modality_registry.list_modalities() if stem in modality_registry.get(n).stems]
        owned = f" ({stem!r} is a stem of {', '.join(owners)})" if owners else ""
        raise ValueError(f"{prefix}stem must be one of {choices} for {m.name}, got {stem!r}{owned}")
    if stem != "auto":
        try:
            m.check_stem(stem, s["config"], s["source"])
        except ValueError as e:
            raise ValueError(f"{prefix}stem: {e}") from None


def backbone_kwargs(model_cfg: dict) -> dict:
    """The ``timm.create_model`` keyword arguments of a resolved ``model`` section."""
    kwargs = dict(model_cfg["kwargs"])
    if model_cfg["mixer"] is not None:
        kwargs["mixer"] = model_cfg["mixer"]
    kwargs["drop_path_rate"] = model_cfg["drop_path_rate"]
    kwargs["drop_rate"] = model_cfg["drop_rate"]
    return kwargs


def _check_backbone_builds(model_cfg: dict, sections: dict) -> None:
    """Build the backbone once, and its stem for every modality's input channels, on the ``meta`` device (no
    memory, no data, well under a second even for the largest variant), so bad ``model.kwargs`` fail here,
    before anything is loaded or written, as a ``ValueError`` naming the section instead of a ``TypeError``
    from a constructor."""
    import timm
    import torch

    import uniperc.modalities as modality_registry

    name = model_cfg["backbone"]
    built = (TypeError, ValueError, IndexError, KeyError, AssertionError, RuntimeError)
    try:
        with torch.device("meta"):
            net = timm.create_model(name, num_classes=0, **backbone_kwargs(model_cfg))
    except built as e:
        raise ValueError(f"model.kwargs / model.mixer do not build {name!r}: {e}") from None
    if not hasattr(net, "make_stem"):
        raise ValueError(f"model.backbone {name!r} is not a uniperc backbone (it has no per-modality stems); "
                         f"uniperc variants: {_uniperc_models()}")
    for modality, section in sections.items():
        try:
            in_chans = modality_registry.get(modality).in_chans(section["config"])
        except ValueError:  # known only once the data is read (weather: its variables); any C' checks the kwargs
            in_chans = 1
        try:
            with torch.device("meta"):
                net.make_stem(in_chans)
        except built as e:
            raise ValueError(f"model.kwargs / model.mixer do not build the stem of {name!r} for "
                             f"modalities.{modality} ({in_chans} input channels): {e}") from None


# what decides the weights a run learns: a resumed run must agree with its checkpoint on these
RESUME_SECTIONS = ("seed", "modalities", "model")


def config_differences(old: dict, new: dict, sections=RESUME_SECTIONS) -> list[str]:
    """``"key: old -> new"`` for every dotted key of ``sections`` whose value differs between two configs."""
    out = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif a != b:
            out.append(f"{prefix}: {a!r} -> {b!r}")

    for section in sections:
        walk(old.get(section), new.get(section), section)
    return out


def _adapter_config(m, section: dict) -> dict:
    """The full adapter config: explicit settings over the demo preset (demo data) or the defaults."""
    base = m.demo_config() if section["source"] == "demo" and hasattr(m, "demo_config") else m.default_config()
    return m.config(base, **(section["config"] or {}))


def _uniperc_models() -> list[str]:
    import timm

    return sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("uniperc."))
