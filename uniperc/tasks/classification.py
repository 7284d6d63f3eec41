"""Single-label classification: one class per sample."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import Task, detached_scores
from .registry import register_task


@register_task("classification")
class Classification(Task):
    """Cross-entropy with label smoothing; metrics top-1 and top-k (k = 5, or the number of classes when fewer)
    accuracy in percent; predictions are the softmax probabilities, reported as the ``top_k`` classes."""

    primary_metric = "top1"
    higher_is_better = True
    unit = "%"
    class_outputs = True
    supports_mixup = True

    def loss(self, outputs, labels, label_smoothing=0.0):
        return F.cross_entropy(outputs, labels.long(), label_smoothing=label_smoothing)

    def predict(self, outputs):
        return outputs.float().softmax(-1)

    def labels_from(self, outputs):
        return outputs.argmax(-1)

    def metrics(self, outputs, labels, output_names=None):
        outputs = detached_scores(outputs)
        labels = labels.detach().long().cpu().reshape(-1)
        k = min(5, outputs.shape[1])
        hit = outputs.topk(k, dim=1).indices == labels[:, None]
        return {"top1": 100.0 * hit[:, 0].float().mean().item(), f"top{k}": 100.0 * hit.any(1).float().mean().item()}

    def postprocess(self, prediction, output_names, top_k=3):
        p, idx = prediction.topk(min(top_k, prediction.numel()))
        return {"top": [{"label": output_names[i], "probability": float(q)} for q, i in zip(p.tolist(), idx.tolist())]}

    def format_prediction(self, result):
        return ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in result["top"])

    def trivial_baselines(self, data, splits):
        from ..baselines import chance_and_majority

        return chance_and_majority(data, splits)

    def baseline_summary(self, title, columns):
        return f"{title} top-1: " + " | ".join(f"{label} {m['top1']:.2f}%" for label, m in columns)

    def did_not_learn(self, metrics, baselines):
        chance = baselines.get("chance", {}).get("top1")
        if chance is not None and metrics["top1"] <= 1.2 * chance:
            return f"top-1 {metrics['top1']:.1f}% is at chance level ({chance:.1f}%)"
        return None

    def report(self, outputs, labels, output_names, metrics, out_dir, name, split):
        """The confusion matrix, and its plot as ``confusion_<name>_<split>.png``."""
        matrix = confusion_matrix(outputs, labels, len(output_names))
        png = plot_confusion(matrix, list(output_names), Path(out_dir) / f"confusion_{name}_{split}.png",
                             f"{name} {split}: top-1 {metrics['top1']:.2f}%")
        return {"confusion_matrix": matrix.tolist(), "confusion_png": str(png)}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    pred = logits.detach().float().argmax(1).cpu().numpy()
    return sk_confusion(labels.detach().long().cpu().numpy().reshape(-1), pred, labels=list(range(num_classes)))


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with the counts written in the cells."""
    from matplotlib.figure import Figure  # no pyplot: never switches a notebook's backend

    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
