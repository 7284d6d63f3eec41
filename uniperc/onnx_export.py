"""ONNX export of uniperc models in deploy form: :func:`export_onnx`.

The model is deep-copied, re-parameterised (:func:`uniperc.reparameterize`) and captured with
``torch.export`` (batch dimension symbolic when ``dynamic_batch``), then translated to ONNX by
``torch.onnx.export(..., dynamo=True)`` (onnxscript). The custom op ``uniperc::dwconv2d`` is replaced
before translation by its decomposition (:func:`_dwconv2d_decomposition`): a grouped ``Conv``
(``groups=C``, 'same' padding, the op's dilation) followed by ``Mul`` / ``Add`` for the optional
scale / shift. DCNv3 is plain PyTorch: its ``grid_sample`` becomes ONNX ``GridSample`` (opset >= 16)
and the rest Reshape / Transpose / arithmetic, so every node is a standard ONNX op.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reparam import reparameterize

OPSET = 18


def _dwconv2d_decomposition(x, weight, bias, scale, shift, dilation):
    """``uniperc::dwconv2d`` in aten ops: what the torch backend computes."""
    k = weight.shape[-1]
    y = F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation, groups=weight.shape[0])
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    return y


DECOMPOSITIONS = {torch.ops.uniperc.dwconv2d.default: _dwconv2d_decomposition}


class _ModalityPath(nn.Module):
    """One modality of a :class:`~uniperc.multimodal.MultiModalNet` as a one-input module."""

    def __init__(self, model, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x):
        return self.model(x, self.modality)


def _sample_dims(model, modality: str | None) -> tuple[int, ...] | None:
    """What the example's dimensions between batch and ``H x W`` must be: ``(C,)``, or ``(V, C')`` for views."""
    from .multimodal import MultiModalNet

    if isinstance(model, MultiModalNet):
        return model.sample_dims(modality)
    n = getattr(model, "in_chans", None)
    return (int(n),) if n is not None else None


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, dynamic_batch: bool = True,
                modality: str | None = None, opset: int = OPSET) -> Path:
    """Write ``model`` (left unchanged: a deep copy is re-parameterised) as an ONNX file at ``path``.

    ``model`` is a uniperc timm model (:class:`~uniperc.UniPercNet`) or a
    :class:`~uniperc.multimodal.MultiModalNet` with ``modality`` naming the path to export; it must be in
    eval mode. ``example_input`` is one ``B x C x H x W`` batch (``B x V x C x H x W`` for a modality whose
    samples hold views); with ``dynamic_batch`` the ONNX input and output have a symbolic batch dimension
    (``"batch"``), H and W stay those of the example. The graph has
    one input ``"input"`` and one output ``"output"``. Bad arguments raise ``ValueError`` before anything
    is written. Returns ``path``.
    """
    from .multimodal import MultiModalNet

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in train mode; call model.eval() first (BatchNorm folding and dropout "
                         "need eval-mode behaviour)")
    if isinstance(model, MultiModalNet):
        if modality not in model.modalities:
            raise ValueError(f"modality {modality!r}: a MultiModalNet export needs one of {model.modalities}")
    elif modality is not None:
        raise ValueError(f"modality={modality!r} is only for a MultiModalNet, got {type(model).__name__}")
    dims = _sample_dims(model, modality)
    rank = 4 if dims is None else len(dims) + 3
    layout = "B x C x H x W" if rank == 4 else "B x V x C x H x W (views x channels)"
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != rank:
        raise ValueError(f"example_input must be a {rank}-D tensor {layout}, got "
                         f"{tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__}")
    given = tuple(example_input.shape[1:-2])
    if dims is not None and given != dims:
        what = "channels" if len(dims) == 1 else "views x channels"
        raise ValueError(f"example_input has {' x '.join(map(str, given))} {what} but the model"
                         f"{'' if modality is None else f' ({modality})'} expects {' x '.join(map(str, dims))}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} of {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a directory; give a file name such as model.onnx")

    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the onnx extra (pip install 'uniperc[onnx]'): {e}") from None

    if modality is not None:  # a MultiModalNet: its deploy form may hold per-modality BatchNorm statistics
        deployed = model.deploy_copy(modality)
    else:
        deployed = reparameterize(copy.deepcopy(model).cpu().float().eval())
    net = _ModalityPath(deployed, modality) if modality is not None else deployed
    x = example_input.detach().cpu().float()
    if dynamic_batch and x.shape[0] == 1:
        x = x.expand(2, *x.shape[1:]).contiguous()  # a batch of 1 would be specialised by torch.export
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.export.export(net, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        program = program.run_decompositions(DECOMPOSITIONS)
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=["input"],
                                         output_names=["output"], opset_version=opset, optimize=True,
                                         verbose=False)
    onnx_program.save(str(path))
    return path
