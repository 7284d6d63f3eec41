"""Data for training: one ``datasets`` split per modality, DataLoaders, and the joint batch order.

Joint training draws every batch from one modality; which one is decided by :func:`schedule`, a list
computed from the seed and the epoch only, so every process agrees on it without communication
(each process then takes its own shard of that modality's batch, through Accelerate's prepared loaders),
and a resumed run can recompute exactly how many batches of each modality the interrupted epoch had used.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader


@dataclass
class TaskData:
    """One modality's data and what the model needs to know about it."""

    name: str
    task: str
    in_chans: int
    input_size: tuple[int, int]
    num_outputs: int
    output_names: list[str]
    adapter_config: dict           # fitted config (with data statistics): saved with checkpoints for prediction
    splits: dict = field(repr=False)  # train / validation / test datasets (transforms attached)
    head: str = "pooled"           # pooled | dense (uniperc.heads)
    target_shape: tuple[int, int, int] | None = None  # (C, H, W) of a field target
    residual_channels: list[int] | None = None  # dense head: input channel added to each target channel


def load_task(name: str, section: dict, seed: int) -> TaskData:
    """Load one modality's DatasetDict as configured in ``modalities.<name>`` (see :mod:`.config`)."""
    import modalities

    m = modalities.get(name)
    kwargs = dict(section["demo"] or {}) if section["source"] == "demo" else {}
    dsd = m.load(source=section["source"], path=section["path"], cfg=section["config"], seed=seed, **kwargs)
    fitted = m.fitted_config(dsd)
    # a modality whose task depends on its config (weather: forecasting, or classification of a label variable)
    task = m.task_for(fitted)
    field_shape = m.field_shape(fitted) if task == "regression" else None
    head, residual = _head_choice(name, section, field_shape, m.persistence_channels(fitted))
    return TaskData(name=name, task=task, in_chans=m.in_chans(fitted), input_size=tuple(m.input_size(fitted)),
                    num_outputs=m.num_outputs(dsd), output_names=m.label_names(dsd), adapter_config=fitted,
                    splits={s: dsd[s] for s in ("train", "validation", "test")}, head=head,
                    target_shape=field_shape, residual_channels=residual)


def _head_choice(name: str, section: dict, field_shape, persistence) -> tuple[str, list[int] | None]:
    """``(head kind, residual channels)`` from ``modalities.<name>.head`` / ``.residual`` and what the task offers."""
    head = section["head"] if section["head"] != "auto" else ("dense" if field_shape else "pooled")
    if head == "dense" and field_shape is None:
        raise ValueError(f"modalities.{name}.head: 'dense' needs a regression target that is a field on a grid; "
                         f"this {name} task has none (use 'pooled')")
    if section["residual"] and (head != "dense" or persistence is None):
        raise ValueError(f"modalities.{name}.residual: true needs a dense head and inputs that hold the last step "
                         f"of every target ({name} with a {head} head has none)")
    return head, (persistence if head == "dense" and section["residual"] is not False else None)


class SeededAugment(torch.utils.data.Dataset):
    """A split whose sample ``i`` in epoch ``e`` is drawn with the RNGs seeded from ``(seed, e, i)``.

    The modalities augment with the global ``torch`` / ``random`` / ``numpy`` generators. Seeding them per
    sample (and restoring them afterwards) makes every augmentation a function of (seed, epoch, index) only:
    independent of DataLoader workers and prefetching, of the number of processes, and of where a resumed run
    picked up. That is what lets a resumed run, or a 2-process run, reproduce an uninterrupted 1-process run.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


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
    sees a batch of one.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=num_workers,
                      collate_fn=collate, drop_last=train and len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def schedule(lengths: dict[str, int], mode: str, seed: int, epoch: int) -> list[str]:
    """The modality of every batch of one epoch: each modality appears ``lengths[m]`` times.

    ``round_robin``: cycle through the modalities in order, dropping each once it is used up.
    ``proportional``: a seeded random shuffle of that multiset, so at any point the modalities have been
    drawn roughly in proportion to their sizes.
    """
    if mode == "round_robin":
        left = dict(lengths)
        out = []
        while any(left.values()):
            for m in lengths:
                if left[m]:
                    out.append(m)
                    left[m] -= 1
        return out
    if mode == "proportional":
        out = [m for m, n in lengths.items() for _ in range(n)]
        random.Random(seed * 100_003 + epoch).shuffle(out)
        return out
    raise ValueError(f"interleave mode must be 'round_robin' or 'proportional', got {mode!r}")
