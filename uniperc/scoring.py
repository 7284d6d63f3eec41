"""Running a model over a split on every process and computing the task metrics on the gathered outputs."""
from __future__ import annotations

import torch


@torch.no_grad()
def collect(accelerator, model, loader, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and labels of the whole split, gathered from all processes (``gather_for_metrics`` drops the
    samples Accelerate duplicated to even out the last batch), on the CPU in float32."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for batch in loader:
        with accelerator.autocast():
            out = model(batch["inputs"], modality=modality)
        out, y = accelerator.gather_for_metrics((out.float().contiguous(), batch["labels"].contiguous()))
        outputs.append(out.cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def evaluate(accelerator, model, head, loader, modality: str) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """``(metrics incl. "loss", outputs, labels)`` of one modality's split."""
    outputs, labels = collect(accelerator, model, loader, modality)
    metrics = {"loss": head.loss(outputs, labels).item(), **head.metrics(outputs, labels)}
    return metrics, outputs, labels
