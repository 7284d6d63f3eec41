"""Training with HF Accelerate, on one modality or several jointly (``uniperc.train.run``, ``train.py``).

* :mod:`.config` — YAML configs, ``--set`` overrides, defaults and validation;
* :mod:`.data` — per-modality datasets and loaders, per-sample seeded augmentation, joint batch order;
* :mod:`.loop` — the loop itself (:func:`run`);
* :mod:`.checkpoint` — atomic ``save_state`` checkpoints and resuming;
* :mod:`.evaluation` — metrics over gathered outputs; :mod:`.tracking` — CSV tracker and curve plot.
"""
from .config import apply_overrides, compose, resolve
from .loop import NonFiniteLossError, build_model, run

__all__ = ["NonFiniteLossError", "apply_overrides", "build_model", "compose", "resolve", "run"]
