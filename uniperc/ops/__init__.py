"""Operators: the fused large-kernel depthwise conv and DCNv3 in plain PyTorch."""
from .dwconv import DWConv2d, dwconv2d
from .dwconv import get_backend, set_backend  # the dwconv backend switch ("auto" | "triton" | "torch")
from .dcnv3 import DCNv3, dcnv3_core  # noqa: F401  (UniConvNet's deformable conv, plain PyTorch)

__all__ = ["DWConv2d", "dwconv2d"]
__all__ += ["get_backend", "set_backend"]
