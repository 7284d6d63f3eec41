"""uniperc: universal perception with one large-kernel ConvNet.

``import uniperc`` registers every variant in timm (``timm.create_model("unireplknet_a")``).
"""
from pathlib import Path as _Path

# uniperc.modalities is the repository's top-level modalities/ folder (a top-level `modalities` would clash with
# an unrelated PyPI package). The wheel installs it as uniperc/modalities/, an editable install maps it with
# pyproject's package-dir (setuptools' import finder); a checkout on PYTHONPATH has neither, so there the
# checkout root is searched for uniperc's subpackages as well (a uniperc/modalities symlink would not survive
# every checkout, copy or archive).
_checkout = _Path(__file__).resolve().parent.parent
if not (_checkout / "uniperc" / "modalities").is_dir() and (_checkout / "modalities" / "__init__.py").is_file():
    __path__.append(str(_checkout))

from . import blocks, ops, variants  # noqa: F401  (registration side effects)
from . import inference  # noqa: F401  (uniperc.inference.prepare after a plain `import uniperc`)
from .backbone import UniPercNet
from .convert import convert_checkpoint, load_converted
from .reparam import reparameterize
from .export import load, save_for_hf
from .onnx_export import export_onnx

__version__ = "0.1.0"
__all__ = ["UniPercNet", "convert_checkpoint", "load_converted", "reparameterize", "load", "save_for_hf", "export_onnx"]
