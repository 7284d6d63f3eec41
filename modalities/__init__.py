"""Modality registry: one module per modality, discovered by file name.

``uniperc.modalities.get("audio")`` imports ``modalities/audio.py`` and returns its ``MODALITY`` object (a
:class:`uniperc.modalities.base.Modality`), which holds both the adapter (raw sample -> ``C'xHxW`` tensor) and
the Hugging Face ``datasets`` loader. Adding a modality means adding one file that defines
``MODALITY``; nothing else has to be edited. Modules are imported lazily so that listing names does not
pull in open3d, PyAV or xarray.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

_NOT_MODALITIES = {"base"}


def list_modalities() -> list[str]:
    """Names of all modalities (the module files of this package), sorted."""
    here = str(Path(__file__).parent)
    return sorted(
        info.name
        for info in pkgutil.iter_modules([here])
        if not info.ispkg and not info.name.startswith("_") and info.name not in _NOT_MODALITIES
    )


@lru_cache(maxsize=None)
def get(name: str):
    """The :class:`~uniperc.modalities.base.Modality` registered under ``name``.

    Raises ``ValueError`` listing the known names when ``name`` is unknown.
    """
    names = list_modalities()
    if name not in names:
        raise ValueError(f"unknown modality {name!r}; known modalities: {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    modality = getattr(module, "MODALITY", None)
    if modality is None:
        raise ValueError(f"{__name__}.{name} defines no MODALITY object")
    return modality


__all__ = ["get", "list_modalities"]
