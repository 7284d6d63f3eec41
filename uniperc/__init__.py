"""uniperc: universal perception with one large-kernel ConvNet.

``import uniperc`` registers every variant in timm (``timm.create_model("unireplknet_a")``).
"""
from . import blocks, ops, variants  # noqa: F401  (registration side effects)
from .backbone import UniPercNet
from .convert import convert_checkpoint, load_converted
from .reparam import reparameterize
from .export import load, save_for_hf
from .onnx_export import export_onnx

__version__ = "0.1.0"
__all__ = ["UniPercNet", "convert_checkpoint", "load_converted", "reparameterize", "load", "save_for_hf", "export_onnx"]
