"""Export a trained model in deploy form (safetensors + JSON config) and load it back.

An export directory holds:

* ``model.safetensors``: the re-parameterised (deploy-form, :func:`uniperc.reparameterize`) weights of the
  whole :class:`~uniperc.multimodal.MultiModalNet` (every stem, the shared stages, every head);
* ``config.json``: backbone name and arguments, and per modality the task, output names, input channels and
  size, and the fitted adapter config that :meth:`modalities.Modality.read_file` needs at prediction time;
* for a single-modality model with a pooled head also ``timm_model.safetensors``: the same weights under the plain timm model's
  keys, loadable with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
  (the exact arguments are in ``config.json["timm"]``; :func:`timm_model` does it for you).

``uniperc.load(DIR)`` rebuilds the model in deploy form and returns it in eval mode; its outputs equal those of
the exported model in eval mode (up to float rounding of the folded kernels).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .heads import TaskHead
from .multimodal import MultiModalNet
from .reparam import reparameterize

FORMAT = "uniperc.multimodal"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIMM_WEIGHTS_FILE = "timm_model.safetensors"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export(model: MultiModalNet, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (left unchanged: a deep copy is re-parameterised) to ``directory``; returns it."""
    if not isinstance(model, MultiModalNet):
        raise ValueError(f"export expects a MultiModalNet, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    deployed = reparameterize(copy.deepcopy(model).cpu().float().eval())
    save_file(_contiguous(deployed.state_dict()), str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": 1, "deploy": True, "backbone": model.backbone_name,
              "backbone_kwargs": model.backbone_kwargs, "tasks": model.tasks, **(extra or {})}
    if len(model.modalities) == 1 and isinstance(model.heads[model.modalities[0]], TaskHead):
        (name,) = model.modalities
        spec = model.tasks[name]
        save_file(_contiguous(deployed.timm_state_dict(name)), str(directory / TIMM_WEIGHTS_FILE))
        config["timm"] = {
            "model_name": model.backbone_name,
            "kwargs": {"in_chans": int(spec["in_chans"]), "num_classes": int(spec["num_outputs"]),
                       **model.backbone_kwargs},
            "pretrained_cfg_overlay": {"file": TIMM_WEIGHTS_FILE, "num_classes": int(spec["num_outputs"]),
                                       "input_size": [int(spec["in_chans"]), *spec.get("input_size", (224, 224))]},
        }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=list))
    return directory


def read_config(directory: str | Path) -> dict:
    """``config.json`` of an export directory; ``ValueError`` if ``directory`` is not one."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a uniperc export directory (no {CONFIG_FILE})")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a uniperc export config (format {config.get('format')!r})")
    return config


def load(directory: str | Path, device: str | torch.device = "cpu") -> MultiModalNet:
    """Rebuild an exported model (deploy form, eval mode) from ``directory``."""
    config = read_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{str(directory)!r} has no {WEIGHTS_FILE}")
    model = MultiModalNet(config["backbone"], config["tasks"], config["backbone_kwargs"])
    if config.get("deploy", True):
        reparameterize(model)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{str(weights)!r} does not fit the model described by its config.json: {e}") from None
    return model.to(device).eval()


def timm_model(directory: str | Path):
    """The single-modality export as a plain timm model, through timm's own pretrained-loading path."""
    import timm

    import uniperc  # noqa: F401  (registers the variants)

    config = read_config(directory)
    if "timm" not in config:
        raise ValueError(f"{str(directory)!r} holds a multi-modality model or a dense head; only single-modality "
                         f"exports with a pooled head load in timm")
    recipe = config["timm"]
    overlay = dict(recipe["pretrained_cfg_overlay"], file=str(Path(directory) / recipe["pretrained_cfg_overlay"]["file"]))
    return timm.create_model(recipe["model_name"], pretrained=True, pretrained_cfg_overlay=overlay,
                             **recipe["kwargs"]).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a trained uniperc model (deploy form) to safetensors.")
    parser.add_argument("--checkpoint", required=True, help="run output dir, checkpoint dir or export dir")
    parser.add_argument("--output", required=True, help="export directory to write")
    parser.add_argument("--onnx", action="store_true",
                        help="also write <modality>.onnx (dynamic batch) and <modality>.json (its task and "
                             "adapter config) per modality")
    args = parser.parse_args(argv)
    from .predict import load_any

    model, meta = load_any(args.checkpoint)
    if args.onnx:
        _check_onnx_available()
    out = export(model, args.output, extra={k: v for k, v in meta.items() if k not in _OWN_KEYS})
    print(f"exported {', '.join(model.modalities)} model to {out}")
    if args.onnx:
        for path in export_onnx_modalities(model, out):
            print(f"wrote {path}")


ONNX_SPEC_FORMAT = "uniperc.onnx_modality"


def _check_onnx_available() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--onnx needs the onnx extra (pip install 'uniperc[onnx]'): {e}") from None


def export_onnx_modalities(model: MultiModalNet, directory: str | Path) -> list[Path]:
    """Per modality ``<modality>.onnx`` (input ``B x C' x H x W`` at the trained size, dynamic batch) and
    ``<modality>.json`` (task, output names, input channels and size, fitted adapter config) in ``directory``."""
    from .onnx_export import export_onnx

    directory = Path(directory)
    written = []
    model = model.eval()
    for name in model.modalities:
        spec = model.tasks[name]
        if "input_size" not in spec:
            raise ValueError(f"modality {name!r} has no input_size in its config; cannot build an example input")
        example = torch.zeros(2, int(spec["in_chans"]), *map(int, spec["input_size"]))
        onnx_path = export_onnx(model, directory / f"{name}.onnx", example, dynamic_batch=True, modality=name)
        side = {"format": ONNX_SPEC_FORMAT, "version": 1, "modality": name, "onnx": onnx_path.name,
                "input_name": "input", "output_name": "output",
                "input_shape": ["batch", int(spec["in_chans"]), *map(int, spec["input_size"])],
                "backbone": model.backbone_name, **spec}
        (directory / f"{name}.json").write_text(json.dumps(side, indent=1, default=list))
        written += [onnx_path, directory / f"{name}.json"]
    return written


_OWN_KEYS = {"format", "version", "deploy", "backbone", "backbone_kwargs", "tasks", "timm"}

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
