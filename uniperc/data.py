"""A task's data, below both the trainer and evaluation: one modality's splits and the DataLoaders over them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from .tasks import get_task


def extra_test_splits(splits) -> list[str]:
    """The extra evaluation splits (``test_<name>``, e.g. audio's ``test_festival``) beyond train/validation/test:
    evaluated after training and by ``uniperc.evaluate --split``, never trained on."""
    return [s for s in splits if s.startswith("test_")]


@dataclass
class TaskData:
    """One modality's data and what the model needs to know about it."""

    name: str
    task: str                      # a uniperc.tasks name (the registry holds its loss, metrics, ...)
    in_chans: int
    input_size: tuple[int, int]
    num_outputs: int
    output_names: list[str]
    adapter_config: dict           # fitted config (with data statistics): saved with checkpoints for prediction
    splits: dict = field(repr=False)  # train / validation / test (+ extra test_<name>) datasets, transforms attached
    head: str = "pooled"           # pooled | dense (uniperc.heads)
    target_shape: tuple[int, int, int] | None = None  # (C, H, W) of a field target
    residual_channels: list[int] | None = None  # dense head: input channel added to each target channel
    stem: str = "backbone"         # backbone | a stem the modality supplies (Modality.stems)
    views: int | None = None       # V of V x C' x H x W samples (folded into the batch, max-pooled after pooling)


# the keys of a trainer modality section that say where a source='dataset' lives and how its columns map
DATASET_KEYS = ("name", "data_files", "columns", "splits")


def dataset_options(section: dict) -> dict:
    """The ``source: dataset`` settings of a (resolved or stored) modality section."""
    return {k: section.get(k) for k in DATASET_KEYS}


def load_task(name: str, source: str, config: dict | None, path=None, demo: dict | None = None,
              seed: int = 0, head: str = "auto", residual: bool | None = None,
              dataset: dict | None = None, stem: str = "auto") -> TaskData:
    """Load one modality's DatasetDict (``source`` demo / folder / hub / dataset, adapter ``config``; ``demo``
    holds the demo-set size knobs, ``dataset`` the :data:`DATASET_KEYS` of a user's dataset) with what the model
    needs to know about it, including the head its target takes and the stem that reads its inputs (``head`` /
    ``residual`` / ``stem`` as in ``modalities.<name>.head`` / ``.residual`` / ``.stem``)."""
    import uniperc.modalities as modalities

    m = modalities.get(name)
    kwargs = dict(demo or {}) if source == "demo" else dict(dataset or {}) if source == "dataset" else {}
    dsd = m.load(source=source, path=path, cfg=config, seed=seed, **kwargs)
    fitted = m.fitted_config(dsd)
    # a modality whose task depends on its config (weather: forecasting, or classification of a label variable)
    task = m.task_for(fitted)
    field_shape = m.field_shape(fitted) if "dense" in get_task(task).heads else None
    head, residual = _head_choice(name, head, residual, field_shape, m.persistence_channels(fitted))
    stem = m.stem_for(fitted) if stem == "auto" else stem
    try:  # what only the opened data tells (weather: stations or a grid)
        m.check_stem(stem, fitted, source)
    except ValueError as e:
        raise ValueError(f"modalities.{name}.stem: {e}") from None
    return TaskData(name=name, task=task, in_chans=m.in_chans(fitted), input_size=tuple(m.input_size(fitted)),
                    num_outputs=m.num_outputs(dsd), output_names=m.label_names(dsd), adapter_config=fitted,
                    splits=dict(dsd), head=head,
                    target_shape=field_shape, residual_channels=residual, stem=stem, views=m.views(fitted))


def _head_choice(name: str, head: str, residual: bool | None, field_shape,
                 persistence) -> tuple[str, list[int] | None]:
    """``(head kind, residual channels)`` from ``modalities.<name>.head`` / ``.residual`` and what the task offers."""
    head = head if head != "auto" else ("dense" if field_shape else "pooled")
    if head == "dense" and field_shape is None:
        raise ValueError(f"modalities.{name}.head: 'dense' needs a regression target that is a field on a grid; "
                         f"this {name} task has none (use 'pooled')")
    if residual and (head != "dense" or persistence is None):
        raise ValueError(f"modalities.{name}.residual: true needs a dense head and inputs that hold the last step "
                         f"of every target ({name} with a {head} head has none)")
    return head, (persistence if head == "dense" and residual is not False else None)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``{"inputs", "labels"}`` samples; a shape mismatch names the offending tensor."""
    out = {}
    for key in ("inputs", "labels"):
        values = [s[key] for s in samples]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {key}: samples have different shapes {sorted(shapes)}")
        out[key] = torch.stack(values)
    return out


def make_loader(dataset, batch_size: int, train: bool, seed: int, num_workers: int) -> DataLoader:
    """A DataLoader with its own generator, so creating its iterator never touches the global RNG.

    Accelerate turns the shuffling sampler into a ``SeedableRandomSampler`` (seeded from ``seed`` + epoch) when
    prepared with ``use_seedable_sampler``; the private ``generator`` also seeds worker processes.
    Training drops the last incomplete batch when the split holds at least one full batch, so BatchNorm never
    sees a batch of one. Workers persist across epochs: forking them anew for every epoch and every validation
    pass, and waiting for their first batch, cost a tenth of the all-five joint recipe's time on 2 cores (a training
    split's augmentation still changes every epoch: :class:`~uniperc.train.data.SeededAugment` shares its epoch).
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=num_workers,
                      collate_fn=collate, drop_last=train and len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
