"""``python -m uniperc.bench recipes``: the results table, reproduced by one command (``make results``).

Every shipped single-modality recipe is trained exactly as ``python train.py --modality M`` would train it
(``configs/M.yaml``), each into its own folder under ``--runs``; ``--joint`` adds the joint recipes
(``configs/multitask.yaml``: audio + image + point cloud; ``configs/multitask_all.yaml``: all five). Each trained model's test score is put beside its trivial baselines (the
``baselines`` of the training summary, :mod:`uniperc.baselines`), one row per modality and evaluated split
(extra evaluation splits such as the audio demo's ``test_festival`` get rows of their own), and the
markdown table is printed and written to ``--output``. ``--config`` / ``--set`` change every recipe alike
(e.g. ``--config configs/tiny.yaml`` for a smoke run in seconds).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPES = ("image", "audio", "point_cloud", "weather", "video")
# in the shipped configs (uniperc.train.config.CONFIG_DIR), wherever installed
JOINT_CONFIGS = {"joint": "multitask.yaml", "joint_all": "multitask_all.yaml"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m uniperc.bench recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(RECIPES), help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--joint", action="store_true", help="also train the joint recipes (" + ", ".join(f"configs/{c}" for c in JOINT_CONFIGS.values()) + ")")
    p.add_argument("--runs", default="runs/recipes", help="parent folder of the run folders (one per recipe)")
    p.add_argument("--output", default="docs/results.md", help="markdown file the table is written to")
    p.add_argument("--config", help="take every recipe's settings from this YAML instead (e.g. configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every recipe, as train.py --set")
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(args.only) - set(RECIPES))
    if unknown or not args.only:
        raise ValueError(f"--only {','.join(args.only)!r}: unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    return args


def train_recipe(modalities: list[str] | None, config: str | None, overrides: list[str], out_dir: Path) -> dict:
    """Train one recipe as ``train.py`` composes it; the summary plus the command's wall time."""
    from uniperc.train import compose, run

    cfg = compose(modalities, config, [*overrides, f"output_dir={out_dir}"])
    t0 = time.perf_counter()
    summary = run(cfg)
    return {**summary, "wall_seconds": time.perf_counter() - t0}


def table_rows(recipe: str, summary: dict) -> list[dict]:
    """One row per modality and evaluated split (test first, then extra ``test_<name>`` splits)."""
    from uniperc.tasks import get_task

    rows = []
    for split, per_modality in summary["metrics"].items():
        if split == "validation":
            continue
        for name, metrics in per_modality.items():
            spec = summary["tasks"][name]
            task = get_task(spec["task"])
            metric = task.primary_metric
            baselines = summary["baselines"][split][name]
            rows.append({
                "recipe": recipe, "modality": name if split == "test" else f"{name} ({split})", "task": task.name,
                "classes": spec["num_outputs"] if task.class_outputs else "-",
                "metric": f"test {metric}", "unit": task.unit, "model": metrics[metric],
                "baselines": {b: m[metric] for b, m in baselines.items() if metric in m},
                "train_s": summary["train_seconds"], "wall_s": summary["wall_seconds"]})
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| recipe | modality | task | classes | metric | model | baseline(s) | train time | wall time |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        unit = r["unit"]
        base = ", ".join(f"{b} {v:.4g}{unit}" for b, v in r["baselines"].items()) or "-"
        lines.append(f"| {r['recipe']} | {r['modality']} | {r['task']} | {r['classes']} | {r['metric']} | "
                     f"{r['model']:.4g}{unit} | {base} | {r['train_s'] / 60:.1f} min | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    runs = Path(args.runs)
    recipes = [(m, [m], args.config) for m in args.only]
    if args.joint:
        from uniperc.train.config import CONFIG_DIR

        recipes += [(label, None, args.config or str(CONFIG_DIR / name)) for label, name in JOINT_CONFIGS.items()]
    rows = []
    for label, modalities, config in recipes:
        print(f"== recipe {label}: {config or f'configs/{label}.yaml'} -> {runs / label}", flush=True)
        rows += table_rows(label, train_recipe(modalities, config, args.overrides, runs / label))
    text = ("# Results\n\nWritten by `python -m uniperc.bench recipes` (`make results`): every recipe trained as "
            "`train.py` trains it, test scores beside the trivial baselines (chance / majority class, persistence / "
            "climatology); classification in top-1 %, forecasting in MSE of normalised values (lower is better).\n\n"
            + markdown(rows))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(markdown(rows) + f"written to {out}")
    return rows
