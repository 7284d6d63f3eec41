"""Multi-label classification: any number of classes per sample."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from .base import Task, detached_scores
from .registry import register_task


@register_task("multilabel")
class MultiLabel(Task):
    """Binary cross-entropy on the logits; metric mAP (percent) = the mean over classes of scikit-learn's
    ``average_precision_score``, taken over the classes with at least one positive in the evaluated set (AP is
    undefined without positives); predictions are per-class sigmoid probabilities, a class is on at 0.5."""

    primary_metric = "mAP"
    higher_is_better = True
    unit = "%"
    class_outputs = True
    supports_mixup = True

    def loss(self, outputs, labels, label_smoothing=0.0):
        return F.binary_cross_entropy_with_logits(outputs, labels.float().reshape(outputs.shape))

    def predict(self, outputs):
        return outputs.float().sigmoid()

    def labels_from(self, outputs):
        return (outputs > 0).float()

    def metrics(self, outputs, labels, output_names=None):
        from sklearn.metrics import average_precision_score

        outputs = detached_scores(outputs)
        y = labels.detach().cpu().reshape(outputs.shape).numpy() > 0.5
        present = y.any(0)
        if not present.any():
            raise ValueError("mAP is undefined: no class has a positive label in the evaluated set")
        ap = average_precision_score(y[:, present], outputs.sigmoid().numpy()[:, present], average=None)
        return {"mAP": 100.0 * float(np.mean(ap))}

    def postprocess(self, prediction, output_names, top_k=3):
        probs = prediction.tolist()
        return {"labels": {output_names[i]: float(q) for i, q in enumerate(probs) if q >= 0.5},
                "probabilities": {output_names[i]: float(q) for i, q in enumerate(probs)}}

    def format_prediction(self, result):
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["labels"].items()) or "(none)"
