"""Evaluate a trained model: ``python -m uniperc.evaluate --checkpoint DIR [--source folder|dataset --path P]``.

For each of the model's modalities (or ``--modality``) it loads the split (default ``test``; or an extra
evaluation split the data has, e.g. the audio demo's ``test_festival``: a synthesiser never heard in training;
the data source
of the training config unless ``--source``/``--path`` say otherwise) with the adapter config saved at training
time, prints the metrics, and writes ``eval_<modality>_<split>.json`` plus what the task adds to it
(:meth:`uniperc.tasks.Task.report`: for classification a confusion matrix and its PNG) into ``--output``
(default: the checkpoint directory). The trivial baselines
(:mod:`uniperc.baselines`: chance / majority class, or persistence / climatology) are printed and written beside
the model's metrics. A run trained on a user's dataset (``source: dataset``) re-opens the same dataset with the
same column and split mapping; ``--path`` points at another copy of it (e.g. the parquet files of a saved
``DatasetDict``; its ``name`` / ``data_files`` are then not reused) and ``--columns`` replaces the mapping. Runs under ``accelerate launch`` too
(the split is sharded and the outputs gathered).

The model runs in its fastest exact form (:func:`uniperc.inference.prepare`: deploy form per modality, best
layout, ``torch.compile`` for splits of at least ``uniperc.inference.COMPILE_MIN_IMAGES`` samples unless
``--compile`` / ``--no-compile`` say otherwise); ``--no-fast`` runs it as loaded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", source: str | None = None,
                        path: str | None = None, modality: str | None = None, output: str | Path | None = None,
                        batch_size: int = 64, columns: dict | None = None, fast: bool = True,
                        compile: bool | str = "auto") -> dict:
    """Metrics per modality (also written as JSON / PNG files, see the module docstring); ``fast`` and ``compile``
    as in :func:`uniperc.inference.prepare`."""
    from accelerate import Accelerator

    from .baselines import compute as compute_baselines, describe
    from .data import dataset_options, load_task, make_loader
    from .inference import prepare
    from .predict import load_any
    from .scoring import evaluate

    if split not in ("train", "validation", "test") and not split.startswith("test_"):
        raise ValueError(f"split must be train, validation, test or an extra test_<name> split, got {split!r}")
    if source in ("folder", "dataset") and not path:
        raise ValueError(f"--source {source} needs --path")
    model, meta = load_any(checkpoint)
    names = [modality] if modality else model.modalities
    for name in names:
        if name not in model.modalities:
            raise ValueError(f"--modality {name!r}: the model has {model.modalities}")
    train_cfg = meta.get("train_config") or {}
    out_dir = Path(output) if output else Path(checkpoint)
    accelerator = Accelerator()
    # the fast form only runs forward, so it needs no DistributedDataParallel wrapper, just the device
    base, model = model, (model.to(accelerator.device) if fast else accelerator.prepare(model))
    results = {}
    for name in names:
        spec = base.tasks[name]
        trained_on = (train_cfg.get("modalities") or {}).get(name) or {}  # resolved at training time
        src, src_path = (source, path) if source is not None else (trained_on.get("source", "demo"),
                                                                   trained_on.get("path"))
        dataset = dataset_options(trained_on) if trained_on.get("source") == "dataset" else {}
        if path is not None:  # another copy: its own files
            dataset.update(name=None, data_files=None)
        if columns is not None:
            dataset["columns"] = columns
        if src == "dataset" and not dataset.get("columns"):
            raise ValueError(f"--source dataset: {name} was not trained on a dataset; give --columns "
                             "(e.g. '{inputs: image, label: label}')")
        data = load_task(name, src, spec["adapter_config"], src_path, trained_on.get("demo"),
                         seed=train_cfg.get("seed", 0), dataset=dataset)
        if split not in data.splits:
            raise ValueError(f"--split {split!r}: the {name} {src} data has only the splits {list(data.splits)} "
                             "(an extra split such as audio's test_festival is written when the demo config asks "
                             "for it: modalities.audio.demo.festival_per_class)")
        loader = accelerator.prepare(make_loader(data.splits[split], batch_size, False, 0, 0))
        head = base.heads[name]
        runner = prepare(model, name, compile=compile, images=len(data.splits[split])) if fast else model
        metrics, outputs, labels = evaluate(accelerator, runner, head, loader, name)
        results[name] = metrics
        accelerator.print(f"{name} {split} ({len(labels)} samples, {src}): "
                          + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        baselines = compute_baselines(data, [split])[split]
        accelerator.print(describe(name, split, metrics, baselines, spec["task"]))
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            report = {"modality": name, "split": split, "source": src, "path": src_path,
                      "checkpoint": str(checkpoint), "samples": len(labels), "metrics": metrics, "baselines": baselines}
            report.update(head.task.report(outputs, labels, head.output_names, metrics, out_dir, name, split))
            (out_dir / f"eval_{name}_{split}.json").write_text(json.dumps(report, indent=1))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a trained uniperc model on a data split.")
    parser.add_argument("--checkpoint", required=True, help="export dir, run output_dir or checkpoints/step_N dir")
    parser.add_argument("--split", default="test",
                        help="train, validation, test (default) or an extra split of the data, e.g. test_festival")
    parser.add_argument("--source", choices=("demo", "folder", "hub", "dataset"),
                        help="data source (default: as in training)")
    parser.add_argument("--path", help="folder of real files (--source folder), or a saved dataset / parquet files "
                                       "(--source dataset)")
    parser.add_argument("--columns", type=_yaml_mapping,
                        help="--source dataset: column mapping as YAML, e.g. '{inputs: img, label: cls}' "
                             "(default: the training run's)")
    parser.add_argument("--modality", help="evaluate only this modality of the model")
    parser.add_argument("--output", help="where to write the JSON / PNG (default: the checkpoint dir)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="run the model as loaded, not in its fast inference form (uniperc.inference)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto",
                        help="torch.compile the fast form (default: for splits of at least "
                             "uniperc.inference.COMPILE_MIN_IMAGES samples)")
    args = parser.parse_args(argv)
    evaluate_checkpoint(args.checkpoint, args.split, args.source, args.path, args.modality, args.output, args.batch_size,
                        args.columns, args.fast, args.compile)


def _yaml_mapping(text: str) -> dict:
    from .train.config import parse_value

    value = parse_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{inputs: img, label: cls}}', got {text!r}")
    return value


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
