"""Operators: the fused large-kernel depthwise conv (with its backend switch) and DCNv3 in plain PyTorch."""
from .dcnv3 import DCNv3, dcnv3_core
from .dwconv import DWConv2d, dwconv2d, get_backend, set_backend

__all__ = ["DCNv3", "DWConv2d", "dcnv3_core", "dwconv2d", "get_backend", "set_backend"]
