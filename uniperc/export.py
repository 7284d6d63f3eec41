"""Export a trained model in deploy form and load it back; one folder serves uniperc and timm / the Hub.

An export directory holds:

* ``uniperc.json``: the multi-modal spec (``format`` ``uniperc.multimodal``, version 2): backbone name and
  arguments, and per modality the task, output names, input channels and size, and the fitted adapter config
  that :meth:`modalities.Modality.read_file` needs at prediction time; ``weights`` names the weight file and
  whether its keys are the plain timm model's (``"timm"``) or the :class:`~uniperc.multimodal.MultiModalNet`'s;
* ``model.safetensors``: the re-parameterised (deploy-form, :func:`uniperc.reparameterize`) weights, or the
  train-form weights (``deploy: false``) of a joint model whose BatchNorm statistics are kept per modality, whose
  deploy form is per modality (:meth:`~uniperc.multimodal.MultiModalNet.deploy_copy`);
* for a single-modality model with a pooled head, the folder is also a timm model folder in the layout of
  ``timm.models.save_for_hf`` / ``push_to_hf_hub``: ``config.json`` (``architecture``, ``num_classes``,
  ``model_args``, ``pretrained_cfg``, ``label_names``) and ``model.safetensors`` under the plain timm model's
  keys, so ``timm.create_model("local-dir:DIR", pretrained=True)`` after ``import uniperc`` (or
  ``"hf-hub:USER/REPO"`` once the folder is uploaded) rebuilds it. Several modalities or a dense head have no
  plain timm model: there ``model.safetensors`` holds the whole MultiModalNet and there is no ``config.json``.

The timm layout stores deploy-form weights and train-form ``model_args``: ``local-dir:`` builds the variant
in train form and its ``pretrained_filter_fn`` (:func:`uniperc.convert.prepare_state_dict`) recognises
deploy-form keys and re-parameterises the new model before loading, so either form loads.
:func:`save_for_hf` writes that layout for a plain uniperc timm model too (in whichever form it is).

``uniperc.load(DIR)`` rebuilds an export in deploy form and returns it in eval mode; its outputs equal those
of the exported model in eval mode (up to float rounding of the folded kernels). On a plain timm folder it
returns the timm model. Export folders of version 1 (the spec in ``config.json``) still load.
``uniperc.inference.prepare(uniperc.load(DIR))`` is its fastest exact inference form (best layout; for a
``deploy: false`` joint export, one deploy form per modality), what ``uniperc.predict`` / ``uniperc.evaluate`` run.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from .convert import _key_report
from .multimodal import MultiModalNet
from .reparam import reparameterize

FORMAT = "uniperc.multimodal"
SPEC_FILE = "uniperc.json"
CONFIG_FILE = "config.json"  # timm's; version 1 exports kept the uniperc spec here
WEIGHTS_FILE = "model.safetensors"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _pooled_modality(model: MultiModalNet, modality: str | None) -> str:
    """``modality`` (by default the only one) if its head is pooled, so a plain timm classifier holds it."""
    if modality is None:
        if len(model.modalities) != 1:
            raise ValueError(f"the model has modalities {model.modalities}: name the one to save as a timm model")
        (modality,) = model.modalities
    if modality not in model.heads:
        raise ValueError(f"modality {modality!r} is not in the model; it has {model.modalities}")
    reason = model.timm_incompatibility(modality)
    if reason:
        raise ValueError(f"modality {modality!r} {reason}")
    return modality


def save_for_hf(model: torch.nn.Module, directory: str | Path, modality: str | None = None, **kwargs) -> Path:
    """Write ``model`` with ``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``), the layout
    that ``timm.create_model("local-dir:DIR", pretrained=True)`` and the Hub read; returns ``directory``.

    A timm model is saved as it is (train or deploy form). Of a :class:`MultiModalNet`, ``modality``'s pooled
    path (stem, shared stages, head; the only modality by default) is saved as the plain timm model, in deploy
    form, with the task's input size, its output names as ``label_names`` and mean 0 / std 1 (its adapter
    already normalises). ``kwargs`` (``model_config``, ``model_args``, ``data_config``) go to timm.
    """
    if isinstance(model, MultiModalNet):
        modality = _pooled_modality(model, modality)
        deployed = model.deploy_copy(modality)
        spec = model.tasks[modality]
        in_chans = int(spec["in_chans"])
        net = timm.create_model(model.backbone_name, in_chans=in_chans, num_classes=int(spec["num_outputs"]),
                                **model.backbone_kwargs)
        reparameterize(net).load_state_dict(deployed.timm_state_dict(modality), strict=True)
        model = net.eval()
        kwargs.setdefault("data_config", {"input_size": (in_chans, *spec.get("input_size", (224, 224))),
                                          "mean": (0.0,) * in_chans, "std": (1.0,) * in_chans})
        if spec.get("output_names"):
            kwargs.setdefault("model_config", {"label_names": list(spec["output_names"])})
    timm.models.save_for_hf(model, str(directory), safe_serialization=True, **kwargs)
    return Path(directory)


def export(model: MultiModalNet, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (left unchanged: a deep copy is re-parameterised) to ``directory``; returns it."""
    if not isinstance(model, MultiModalNet):
        raise ValueError(f"export expects a MultiModalNet, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # a joint model with BatchNorm statistics per modality has one deploy form per modality, so the whole net is
    # stored in train form (save_for_hf / export_onnx give each modality's deploy form)
    deploy = not model.norm_stats_per_modality
    spec = {"format": FORMAT, "version": 2, "deploy": deploy, "backbone": model.backbone_name,
            "backbone_kwargs": model.backbone_kwargs, "tasks": model.tasks, **(extra or {})}
    if len(model.modalities) == 1 and model.timm_incompatibility(model.modalities[0]) is None:
        save_for_hf(model, directory)
        spec["weights"] = {"file": WEIGHTS_FILE, "keys": "timm", "modality": model.modalities[0]}
    else:
        deployed = model.deploy_copy() if deploy else copy.deepcopy(model).cpu().float().eval()
        save_file(_contiguous(deployed.state_dict()), str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (directory / CONFIG_FILE).unlink(missing_ok=True)  # a stale timm config would describe other weights
        spec["weights"] = {"file": WEIGHTS_FILE, "keys": "multimodal"}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1, default=list))
    return directory


def _legacy_spec(directory: Path) -> dict | None:
    """A version 1 export's spec (in ``config.json``), else None."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if config.get("format") == FORMAT else None


def is_export_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a uniperc export (either version), not merely a timm model."""
    directory = Path(directory)
    return (directory / SPEC_FILE).is_file() or _legacy_spec(directory) is not None


def read_config(directory: str | Path) -> dict:
    """The uniperc spec of an export directory; ``ValueError`` if ``directory`` is not one."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.is_file():
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} is not a uniperc export directory (no {SPEC_FILE})")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a uniperc export config (format {config.get('format')!r})")
    return config


def _from_timm_keys(state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """Inverse of :meth:`MultiModalNet.timm_state_dict`."""
    renames = {"stem.": f"stems.{modality}.", "head.": f"heads.{modality}."}
    return {next((new + k[len(old):] for old, new in renames.items() if k.startswith(old)), k): v
            for k, v in state.items()}


def _load_timm_folder(directory: Path) -> torch.nn.Module:
    """A timm model folder through ``local-dir:``, with ``ValueError`` for what timm reports otherwise."""
    name = json.loads((directory / CONFIG_FILE).read_text()).get("architecture")
    if not timm.is_model(name):
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} names model {name!r}, which is not registered in timm")
    try:
        return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    except RuntimeError as e:  # strict load_state_dict of a timm model without our pretrained_filter_fn
        raise ValueError(f"the weights in {str(directory)!r} do not fit {name!r}: {e}") from None


def load(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild an exported model (deploy form, eval mode) from ``directory``; a folder holding only a timm
    model (:func:`save_for_hf`) gives that timm model."""
    directory = Path(directory)
    if not is_export_dir(directory) and (directory / CONFIG_FILE).is_file():
        if "architecture" in json.loads((directory / CONFIG_FILE).read_text()):
            return _load_timm_folder(directory).to(device)
    config = read_config(directory)
    layout = config.get("weights", {"file": WEIGHTS_FILE, "keys": "multimodal"})
    weights = directory / layout["file"]
    if not weights.is_file():
        raise ValueError(f"{str(directory)!r} has no {layout['file']}")
    model = MultiModalNet(config["backbone"], config["tasks"], config["backbone_kwargs"])
    if config.get("deploy", True):
        reparameterize(model)
    state = load_file(str(weights))
    if layout["keys"] == "timm":
        state = _from_timm_keys(state, layout["modality"])
    report = _key_report(model.state_dict(), state)
    if report:
        raise ValueError(f"{str(weights)!r} does not fit the model its uniperc spec describes: {report}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def timm_model(directory: str | Path) -> torch.nn.Module:
    """The single-modality export as a plain timm model, through timm's own ``local-dir:`` path."""
    config = read_config(directory)
    if config.get("weights", {}).get("keys") != "timm":
        raise ValueError(f"{str(directory)!r} holds a multi-modality model or a dense head; only single-modality "
                         f"exports with a pooled head load in timm")
    return _load_timm_folder(Path(directory))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a trained uniperc model (deploy form) to safetensors.")
    parser.add_argument("--checkpoint", required=True, help="run output dir, checkpoint dir or export dir")
    parser.add_argument("--output", required=True, help="export directory to write")
    parser.add_argument("--onnx", action="store_true",
                        help="also write <modality>.onnx (dynamic batch) and <modality>.json (its task and "
                             "adapter config) per modality")
    parser.add_argument("--modality", help="write only this modality's pooled path, as a plain timm model folder "
                                           "(timm.models.save_for_hf layout, loads with local-dir:OUTPUT)")
    args = parser.parse_args(argv)
    from .predict import load_any

    model, meta = load_any(args.checkpoint)
    if args.modality is not None:
        out = save_for_hf(model, args.output, modality=args.modality)
        print(f"saved the {args.modality} path as a timm model to {out}")
        return
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
        example = torch.zeros(2, *model.input_shape(name))
        onnx_path = export_onnx(model, directory / f"{name}.onnx", example, dynamic_batch=True, modality=name)
        side = {"format": ONNX_SPEC_FORMAT, "version": 1, "modality": name, "onnx": onnx_path.name,
                "input_name": "input", "output_name": "output",
                "input_shape": ["batch", *model.input_shape(name)],
                "backbone": model.backbone_name, **spec}
        (directory / f"{name}.json").write_text(json.dumps(side, indent=1, default=list))
        written += [onnx_path, directory / f"{name}.json"]
    return written


_OWN_KEYS = {"format", "version", "deploy", "backbone", "backbone_kwargs", "tasks", "weights",
             "timm"}  # "timm": version 1

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
