"""Task heads: losses and metrics against hand-computed / scikit-learn values."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from uniperc.heads import TaskHead
from uniperc.tasks import get_task
from uniperc.tasks.classification import confusion_matrix


def task_metrics(task, outputs, labels, output_names=None):
    return get_task(task).metrics(outputs, labels, output_names)


def test_classification_topk_and_label_smoothing():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0]])
    labels = torch.tensor([0, 2, 0])
    m = task_metrics("classification", logits, labels)
    assert m["top1"] == pytest.approx(100 / 3)  # only the first is right
    assert m["top5"] == pytest.approx(200 / 3)  # the third's class 0 ranks 6th
    head = TaskHead(8, 6, "classification", label_smoothing=0.1)
    assert head.loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert head.loss(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item())


@pytest.mark.parametrize("task, labels", [("classification", torch.tensor([0, 1, 2, 0, 1, 2])),
                                          ("multilabel", torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]] * 2))])
def test_mixup_blends_the_inputs_and_its_loss_is_the_loss_of_the_blended_target(task, labels):
    """``training_loss`` with mixup feeds ``lam * x + (1 - lam) * x[perm]`` and its loss equals the task's loss
    against the blended (label-smoothed) target, which is why only tasks with ``supports_mixup`` may use it."""
    from uniperc.train.loop import mixup, training_loss

    x = torch.randn(6, 1, 4, 4)
    head = TaskHead(16, 3, task, label_smoothing=0.1)
    seen = {}

    def model(inputs, modality):
        seen["inputs"] = inputs
        return 3 * inputs.flatten(1)[:, :3]

    torch.manual_seed(1)
    loss = training_loss(model, head, "m", {"inputs": x, "labels": labels}, mixup_alpha=0.4)
    torch.manual_seed(1)
    mixed, lam, perm = mixup(x, 0.4)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    assert torch.equal(seen["inputs"], mixed) and torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    logits = 3 * mixed.flatten(1)[:, :3]
    if task == "classification":
        soft = lambda y: 0.9 * F.one_hot(y, 3).float() + 0.1 / 3  # noqa: E731  (label smoothing 0.1)
        expected = F.cross_entropy(logits, lam * soft(labels) + (1 - lam) * soft(labels[perm]))
    else:
        expected = F.binary_cross_entropy_with_logits(logits, lam * labels + (1 - lam) * labels[perm])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = training_loss(model, head, "m", {"inputs": x, "labels": labels})
    assert torch.equal(seen["inputs"], x) and plain.item() == pytest.approx(head.loss(3 * x.flatten(1)[:, :3], labels).item())


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


FAMILIES = [("unireplknet_a", dict(kernel_sizes=(3, 5, 5, 5))), ("uniconvnet_a", {}),
            ("pelk_t", dict(kernel_sizes=(7, 7, 7, 7))), ("van_b0", {})]


@pytest.mark.parametrize("grid", [(32, 64), (33, 47)])
@pytest.mark.parametrize("backbone, kwargs", FAMILIES)
def test_dense_head_predicts_the_native_grid_for_every_family(backbone, kwargs, grid):
    from uniperc.multimodal import MultiModalNet

    torch.manual_seed(0)
    spec = dict(in_chans=5, task="regression", num_outputs=2 * grid[0] * grid[1], output_names=["a", "b"],
                head="dense", target_shape=[2, *grid], residual_channels=[1, 3])
    model = MultiModalNet(backbone, {"w": spec}, dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), **kwargs)).eval()
    x = torch.randn(2, 5, *grid)
    with torch.no_grad():
        y = model(x, "w")
    assert y.shape == (2, 2 * grid[0] * grid[1])
    # the last layer starts at zero: the residual head forecasts the chosen input channels exactly
    assert torch.equal(y.view(2, 2, *grid), x[:, [1, 3]])
    head = model.heads["w"]
    torch.nn.init.normal_(head.out.weight)
    with torch.no_grad():
        moved = model(x, "w").view(2, 2, *grid) - x[:, [1, 3]]
    assert moved.abs().amin(dim=(0, 1)).gt(0).float().mean() > 0.9  # the decoder now reaches every grid point


def test_dense_head_residual_is_optional_and_resizes_the_input():
    from uniperc.heads import DenseHead

    head = DenseHead([8, 16], in_chans=3, target_shape=(1, 10, 20), output_names=["a"]).eval()
    feats = [torch.randn(2, 8, 4, 8), torch.randn(2, 16, 2, 4)]
    assert torch.equal(head(feats, torch.randn(2, 3, 10, 20)), torch.zeros(2, 200))  # no residual: zero at init
    res = DenseHead([8, 16], in_chans=3, target_shape=(1, 10, 20), residual_channels=[2]).eval()
    x = torch.randn(2, 3, 5, 10)  # input on a coarser grid than the target (weather's image_size)
    expected = F.interpolate(x[:, 2:3], size=(10, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(res(feats, x), expected.flatten(1))
    with pytest.raises(ValueError, match="residual_channels"):
        DenseHead([8, 16], in_chans=3, target_shape=(2, 10, 20), residual_channels=[2])


def test_masked_targets_do_not_count_in_loss_or_metrics():
    target = torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [0.0, 2.0, float("nan"), 4.0]])
    pred = torch.tensor([[2.0, 1e6, 3.0, -1e6], [0.0, 4.0, 7.0, 4.0]], requires_grad=True)
    head = TaskHead(8, 4, "regression", output_names=["t", "u"])
    loss = head.loss(pred, target)
    assert loss.item() == pytest.approx((1 + 0 + 0 + 4 + 0) / 5)  # the 5 valid points: errors 1, 0, 0, 2, 0
    loss.backward()
    assert torch.equal(pred.grad[torch.isnan(target)], torch.zeros(3))
    m = task_metrics("regression", pred.detach(), target, ["t", "u"])
    assert m["mse"] == pytest.approx(1.0) and m["rmse"] == pytest.approx(1.0) and m["mae"] == pytest.approx(0.6)
    assert m["mse/t"] == pytest.approx(5 / 3) and m["mse/u"] == 0.0  # t (outputs 0-1): errors 1, 0, 2; u: 0, 0
    all_masked = torch.full((2, 4), float("nan"))
    assert head.loss(pred, all_masked).item() == 0.0
    with pytest.raises(ValueError, match="masked"):
        task_metrics("regression", pred.detach(), all_masked)
