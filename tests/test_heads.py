"""Task heads: losses and metrics against hand-computed / scikit-learn values."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from uniperc.heads import TaskHead, confusion_matrix, task_metrics


def test_classification_topk_and_label_smoothing():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0]])
    labels = torch.tensor([0, 2, 0])
    m = task_metrics("classification", logits, labels)
    assert m["top1"] == pytest.approx(100 / 3)  # only the first is right
    assert m["top5"] == pytest.approx(200 / 3)  # the third's class 0 ranks 6th
    head = TaskHead(8, 6, "classification", label_smoothing=0.1)
    assert head.loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert head.loss(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item())


def test_topk_is_capped_by_class_count():
    m = task_metrics("classification", torch.tensor([[0.0, 1, 2]]), torch.tensor([0]))
    assert set(m) == {"top1", "top3"} and m["top3"] == 100.0 and m["top1"] == 0.0


def test_multilabel_map_matches_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random((40, 5)) > 0.6).astype(np.float32)
    y[:, 4] = 0  # a class without positives is left out of the mean
    logits = torch.from_numpy(rng.normal(size=(40, 5)).astype(np.float32)) + torch.from_numpy(y)
    expected = np.mean([average_precision_score(y[:, c], torch.sigmoid(logits[:, c]).numpy()) for c in range(4)])
    assert task_metrics("multilabel", logits, torch.from_numpy(y))["mAP"] == pytest.approx(100 * expected, rel=1e-6)
    head = TaskHead(8, 5, "multilabel")
    assert head.loss(logits, torch.from_numpy(y)).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y)).item())


def test_regression_per_variable_groups():
    pred = torch.zeros(2, 4)
    target = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]])  # variable "t" = outputs 0-1, "u" = outputs 2-3
    m = task_metrics("regression", pred, target, ["t", "u"])
    assert m["mse/t"] == pytest.approx(1.0) and m["mse/u"] == pytest.approx(4.0)
    assert m["mae/u"] == pytest.approx(2.0) and m["mse"] == pytest.approx(2.5)
    head = TaskHead(8, 4, "regression", output_names=["t", "u"])
    assert head.loss(pred, target).item() == pytest.approx(2.5)


def test_head_has_timm_head_keys_and_shapes():
    head = TaskHead(16, 7, "classification")
    assert set(head.state_dict()) == {"norm.weight", "norm.bias", "fc.weight", "fc.bias"}
    assert head(torch.randn(3, 16, 4, 4)).shape == (3, 7)
    assert set(TaskHead(16, 7, norm=None).state_dict()) == {"fc.weight", "fc.bias"}


def test_confusion_matrix_counts():
    logits = torch.eye(3)[[0, 1, 1, 2]]
    cm = confusion_matrix(logits, torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("kwargs, word", [(dict(task="nope"), "task"), (dict(label_smoothing=1.0), "label_smoothing"),
                                          (dict(output_names=["a"]), "output_names")])
def test_bad_head_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TaskHead(8, 3, **kwargs)
