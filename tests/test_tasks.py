"""Contract tests of every registered task (they grow with the registry: a new task file is tested here as is),
and a task registered inside a test training through the same head, loss and metrics code."""
import json

import pytest
import torch
import torch.nn.functional as F

from uniperc.multimodal import MultiModalNet
from uniperc.tasks import Task, get_task, list_tasks, register_task
from uniperc.tasks import registry
from uniperc.tasks.base import detached_scores

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(3, 5, 5, 5))
NAMES = list("abcd")
FIELD = (2, 8, 8)  # a dense head's target: 2 variables on an 8 x 8 grid


def _spec(task: str, head: str) -> dict:
    if head == "dense":
        return dict(in_chans=3, task=task, num_outputs=FIELD[0] * FIELD[1] * FIELD[2], output_names=["u", "v"],
                    head="dense", target_shape=list(FIELD))
    return dict(in_chans=3, task=task, num_outputs=len(NAMES), output_names=NAMES)


def check_contract(task_name: str, head: str, tmp_path) -> None:
    """What every task promises to heads, the trainer, evaluate and predict."""
    task = get_task(task_name)
    assert isinstance(task, Task) and task.name == task_name and head in task.heads
    torch.manual_seed(0)
    model = MultiModalNet("unireplknet_a", {"m": _spec(task_name, head)}, TINY)
    m = model.heads["m"]
    assert m.task.name == task_name

    # loss: finite, and back-propagates into the head and through the shared backbone (a dense head's zero-init
    # last layer passes zero gradients on at the first step, but passes them)
    x = torch.randn(4, 3, *FIELD[1:])
    out = model(x, "m")
    labels = task.labels_from(torch.randn_like(out))
    loss = m.loss(out, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(p.grad is not None for p in model.stages.parameters())

    # metrics hold the primary one, and a perfect prediction scores better than a random one
    g = torch.Generator().manual_seed(1)
    perfect = 3 * torch.randn(64, out.shape[1], generator=g)
    truth = task.labels_from(perfect)
    best = m.metrics(perfect, truth)
    rand = m.metrics(torch.randn(64, out.shape[1], generator=g), truth)
    assert task.primary_metric in best and all(isinstance(v, float) for v in best.values())
    p_best, p_rand = best[task.primary_metric], rand[task.primary_metric]
    assert (p_best > p_rand) if task.higher_is_better else (p_best < p_rand)
    assert task.did_not_learn(best, {}) is None
    assert "model" in task.baseline_summary("test m", [("model", best), ("random", rand)])

    # predict's result, the evaluate report and the baselines' empty default are JSON / text
    with torch.no_grad():
        prediction = m.predict(model.eval()(x[:1], "m"))[0]
    result = task.postprocess(prediction, m.output_names, top_k=2)
    json.dumps(result)
    assert isinstance(task.format_prediction(result), str)
    json.dumps(task.report(perfect, truth, m.output_names, best, tmp_path, "m", "test"))


@pytest.mark.parametrize("task_name, head", [(t, h) for t in list_tasks() for h in get_task(t).heads])
def test_task_contract(task_name, head, tmp_path):
    check_contract(task_name, head, tmp_path)


def test_the_shipped_tasks_are_registered():
    assert {"classification", "multilabel", "regression"} <= set(list_tasks())


def test_unknown_task_names_the_registered_ones():
    with pytest.raises(ValueError) as e:
        get_task("segmentation")
    assert "segmentation" in str(e.value) and all(name in str(e.value) for name in list_tasks())
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        MultiModalNet("unireplknet_a", {"m": _spec("segmentation", "pooled")}, TINY)


def test_a_head_kind_the_task_does_not_take_is_refused():
    with pytest.raises(ValueError, match="dense head cannot predict a classification task"):
        MultiModalNet("unireplknet_a", {"m": _spec("classification", "dense")}, TINY)


def test_a_name_cannot_be_registered_twice(monkeypatch):
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    with pytest.raises(ValueError, match="task name 'regression' is already registered"):
        register_task("regression")(type("Other", (Task,), {}))


def test_a_new_task_is_one_class(monkeypatch, tmp_path):
    """The binary task of docs/training.md ("Adding a task"), defined here with nothing else edited, passes the
    contract and trains through MultiModalNet's head, loss and metrics; the registry is restored afterwards."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))

    @register_task("binary")
    class Binary(Task):
        primary_metric, higher_is_better, unit = "accuracy", True, "%"

        def loss(self, outputs, labels, label_smoothing=0.0):
            return F.binary_cross_entropy_with_logits(outputs[:, 0], labels.float())

        def predict(self, outputs):
            return outputs.float().sigmoid()

        def labels_from(self, outputs):
            return (outputs[:, 0] > 0).long()

        def metrics(self, outputs, labels, output_names=None):
            outputs = detached_scores(outputs)
            return {"accuracy": 100.0 * ((outputs[:, 0] > 0).long() == labels.reshape(-1)).float().mean().item()}

        def postprocess(self, prediction, output_names, top_k=3):
            return {"probability": float(prediction[0])}

        def format_prediction(self, result):
            return f"{100 * result['probability']:.1f}%"

    assert "binary" in list_tasks()
    check_contract("binary", "pooled", tmp_path)

    torch.manual_seed(0)
    spec = dict(in_chans=3, task="binary", num_outputs=1, output_names=["yes"])
    model = MultiModalNet("unireplknet_a", {"m": spec}, TINY)
    head = model.heads["m"]
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]
    loss = head.loss(model(x, "m"), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    with torch.no_grad():
        assert set(head.metrics(model.eval()(x, "m"), y)) == {"accuracy"}
