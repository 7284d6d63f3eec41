"""Classify raw files with a trained model: ``python -m uniperc.predict --checkpoint DIR FILE...``.

Each file goes through its modality's own reader (``uniperc.modalities.get(m).read_file``: .wav/.flac audio,
.ply/.off/.pcd point clouds, .nc weather, .mp4 video, .png images), with the adapter config saved at training
time, then through that modality's stem and head. The modality is chosen from the file extension among the
model's modalities (``--modality`` forces one).

``--checkpoint`` accepts an export directory (``uniperc.export``), a training run's ``output_dir`` (its
``model/`` export) or one checkpoint folder ``<output_dir>/checkpoints/step_N`` (train-form weights). Either
runs in its fastest exact form (:func:`uniperc.inference.prepare`: deploy form, best layout); ``--no-fast``
runs the model as loaded, ``--compile`` adds ``torch.compile`` (minutes on a CPU: worth it only for many files).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import export as export_mod
from . import runs
from .inference import FastModel, prepare
from .multimodal import MultiModalNet


def load_any(path: str | Path, device: str = "cpu") -> tuple[MultiModalNet, dict]:
    """``(model in eval mode, its config)`` from an export dir, a run dir or a checkpoint dir."""
    from safetensors.torch import load_file

    path = Path(path)
    if export_mod.is_export_dir(path):
        return export_mod.load(path, device), export_mod.read_config(path)
    if export_mod.is_export_dir(path / runs.EXPORT_DIR):
        return export_mod.load(path / runs.EXPORT_DIR, device), export_mod.read_config(path / runs.EXPORT_DIR)
    if runs.is_checkpoint(path):
        run_dir = runs.run_dir_of(path)
        spec = runs.read_model_spec(run_dir)
        model = MultiModalNet(spec["backbone"], spec["tasks"], spec["backbone_kwargs"])
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no model.safetensors")
        model.load_state_dict(load_file(str(weights)), strict=True)
        train_config = runs.read_trainer_state(path).get("config") or runs.read_config(run_dir)
        if train_config is not None:
            spec["train_config"] = train_config
        return model.to(device).eval(), spec
    raise ValueError(f"{str(path)!r} is neither an export directory, a run output_dir nor a complete checkpoint")


def modality_for(path: Path, model: MultiModalNet, forced: str | None = None) -> str:
    """The model's modality that reads ``path`` (by extension), or ``forced``."""
    import uniperc.modalities as modalities

    if forced is not None:
        if forced not in model.modalities:
            raise ValueError(f"--modality {forced!r}: the model has {model.modalities}")
        return forced
    matches = [m for m in model.modalities
               if path.name.lower().endswith(tuple(modalities.get(m).file_extensions))]
    if len(matches) != 1:
        raise ValueError(f"file {str(path)!r}: {'no' if not matches else 'more than one'} modality of the model "
                         f"({model.modalities}) reads this extension{'' if not matches else ': ' + str(matches)}; "
                         f"pass --modality")
    return matches[0]


@torch.no_grad()
def predict_files(model: MultiModalNet | FastModel, files: list[str | Path], modality: str | None = None,
                  top_k: int = 3, fast: bool = True, compile: bool | str = "auto") -> list[dict]:
    """One result dict per file: file, modality, task, and what the task makes of the outputs
    (:meth:`uniperc.tasks.Task.postprocess`: the top classes with probabilities, or the regression values).
    ``fast`` runs a :class:`MultiModalNet` through :func:`uniperc.inference.prepare` (with ``compile``);
    pass a prepared model to reuse its deploy forms across calls."""
    import uniperc.modalities as modalities

    if fast and not isinstance(model, FastModel):
        model = prepare(model, compile=compile, images=len(files))
    device = model.device if isinstance(model, FastModel) else next(model.parameters()).device
    results = []
    for f in files:
        f = Path(f)
        name = modality_for(f, model, modality)
        spec = model.tasks[name]
        x = modalities.get(name).read_file(f, spec.get("adapter_config"))
        head = model.heads[name]
        prediction = head.predict(model(x[None].to(device), modality=name))[0]
        row = {"file": str(f), "modality": name, "task": spec["task"],
               **head.task.postprocess(prediction, head.output_names, top_k)}
        results.append(row)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Predict raw files with a trained uniperc model.")
    parser.add_argument("--checkpoint", required=True, help="export dir, run output_dir or checkpoints/step_N dir")
    parser.add_argument("files", nargs="+", help="raw files (.wav/.flac, .ply/.off/.pcd, .nc, .mp4, .png, ...)")
    parser.add_argument("--modality", help="force the modality instead of choosing it by extension")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="run the model as loaded, not in its fast inference form (uniperc.inference)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto",
                        help="torch.compile the fast form (default: only from "
                             "uniperc.inference.COMPILE_MIN_IMAGES files on)")
    args = parser.parse_args(argv)
    model, _ = load_any(args.checkpoint)
    for row in predict_files(model, args.files, args.modality, args.top_k, args.fast, args.compile):
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['file']}: " + model.heads[row["modality"]].task.format_prediction(row))

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
