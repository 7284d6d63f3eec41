"""uniperc.inference.prepare: deploy form, layout and torch.compile give the eval outputs exactly; predict and
evaluate use it by default and report what the slow path reports."""
import copy
import json

import pytest
import timm
import torch

from uniperc.inference import COMPILE_MIN_IMAGES, FastModel, choose_layout, prepare, should_compile
from uniperc.multimodal import MultiModalNet
from conftest import JOINT_TASKS as TASKS, randomize_bn_and_scales, warmed_joint_net

FAMILIES = [
    ("unireplknet_a", dict(kernel_sizes=(3, 13, 5, 5))),
    ("uniconvnet_a", {}),
    ("pelk_t", dict(kernel_sizes=(15, 13, 7, 7))),  # 15 and 13: the CPU op's channels_last and NCHW paths
    ("van_b0", {}),
]
TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", FAMILIES)
def test_every_family_is_exact_in_each_layout(name, kwargs):
    torch.manual_seed(0)
    model = randomize_bn_and_scales(timm.create_model(name, num_classes=7, **TINY, **kwargs)).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        ref = model(x)
    for layout in ("auto", "nchw", "channels_last"):
        _close(prepare(model, layout=layout, compile=False)(x), ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was


def test_joint_model_gets_one_exact_deploy_form_per_modality():
    model, inputs = warmed_joint_net()
    assert model.norm_stats_per_modality
    fast = prepare(model)
    for name, x in inputs.items():
        with torch.no_grad():
            _close(fast(x, name), model(x, name))
    assert sorted(fast.forms) == ["audio", "image"]  # cached, one per modality
    assert fast.forms["audio"] is fast._form("audio")
    assert fast.tasks is model.tasks and fast.modalities == model.modalities


def test_single_statistics_model_shares_one_deploy_form():
    torch.manual_seed(0)
    model = randomize_bn_and_scales(MultiModalNet("van_b0", {"image": TASKS["image"]}, TINY)).eval()
    fast = prepare(model, "image")
    assert list(fast.forms) == ["*"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(fast(x, "image"), model(x, "image"))


def test_layout_and_compile_rules():
    assert choose_layout("auto", torch.device("cpu")) == torch.channels_last
    assert choose_layout("auto", torch.device("cuda", 0)) == torch.contiguous_format  # not measured: as given
    assert choose_layout("nchw", torch.device("cpu")) == torch.contiguous_format
    torch.manual_seed(0)
    model = timm.create_model("unireplknet_a", num_classes=3, **TINY, kernel_sizes=(3, 5, 5, 5)).eval()
    fast = prepare(model)
    deployed = fast._form(None)
    assert deployed.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert should_compile("auto", COMPILE_MIN_IMAGES) and not should_compile("auto", COMPILE_MIN_IMAGES - 1)
    assert not should_compile("auto", None) and should_compile(True, 1) and not should_compile(False, 10 ** 9)
    assert not prepare(model, images=100).use_compile and prepare(model, images=COMPILE_MIN_IMAGES).use_compile


def test_bad_input_is_refused():
    model, inputs = warmed_joint_net()
    fast = prepare(model)
    with pytest.raises(ValueError, match="no stem"):
        fast(inputs["image"], "video")
    with pytest.raises(ValueError, match="no stem"):
        prepare(model, "video")
    with pytest.raises(ValueError, match="cannot train"):
        fast.train()
    with pytest.raises(ValueError, match="train mode"):
        prepare(copy.deepcopy(model).train())
    with pytest.raises(ValueError, match="layout"):
        prepare(model, layout="nhwc")
    with pytest.raises(ValueError, match="compile"):
        prepare(model, compile="yes")
    with pytest.raises(ValueError, match="already"):
        prepare(fast)
    plain = timm.create_model("van_b0", num_classes=3, **TINY).eval()
    with pytest.raises(ValueError, match="no modalities"):
        prepare(plain)(torch.randn(1, 3, 32, 32), "image")


@pytest.mark.slow
def test_compiled_form_is_exact_and_serves_other_shapes_eagerly():
    torch.manual_seed(0)
    model = randomize_bn_and_scales(timm.create_model("unireplknet_a", num_classes=3, **TINY,
                                                      kernel_sizes=(3, 5, 5, 5))).eval()
    fast = prepare(model, compile=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _close(fast(x), model(x))
        _close(fast(x[:3]), model(x[:3]))  # the last partial batch: eager, no recompilation
    (graph, shape), = fast._graphs.values()
    assert shape == x.shape


def test_predict_and_evaluate_match_the_slow_path(tmp_path, monkeypatch):
    """A joint run: its export keeps per-modality statistics (train form), its checkpoint is train form."""
    import uniperc.modalities as modalities
    from uniperc.evaluate import evaluate_checkpoint
    from uniperc.predict import load_any, predict_files
    from uniperc.runs import latest
    from uniperc.train import compose, run
    from uniperc.train.config import CONFIG_DIR

    monkeypatch.setenv("UNIPERC_DATA", str(tmp_path / "data"))
    run(compose(["image", "audio"], str(CONFIG_DIR / "tiny.yaml"), [f"output_dir={tmp_path / 'r'}"]))
    assert json.loads((tmp_path / "r" / "model" / "uniperc.json").read_text())["deploy"] is False
    checkpoint = tmp_path / "r" / "checkpoints" / latest(tmp_path / "r").name
    for source in (tmp_path / "r", checkpoint):
        fast = evaluate_checkpoint(source, output=tmp_path / "fast")
        slow = evaluate_checkpoint(source, output=tmp_path / "slow", fast=False)
        for name in ("image", "audio"):
            assert fast[name] == pytest.approx(slow[name], rel=1e-4, abs=1e-5)
    files = sorted((modalities.get("image").ensure_demo(seed=0, n_per_class=6) / "test").rglob("*.png"))[:2]
    model, _ = load_any(checkpoint)
    fast_rows = predict_files(model, files)
    slow_rows = predict_files(model, files, fast=False)
    for f, s in zip(fast_rows, slow_rows):
        assert [t["label"] for t in f["top"]] == [t["label"] for t in s["top"]]
        assert [t["probability"] for t in f["top"]] == pytest.approx([t["probability"] for t in s["top"]], abs=1e-5)
    assert isinstance(prepare(model), FastModel)


def test_inference_benchmark_checks_every_form_against_the_train_form():
    from uniperc.bench.inference import measure

    r = measure("van_b0", batch=1, size=32, rounds=1)
    assert set(r) == {"train", "deploy_nchw", "fast", "max_rel_err"} and r["max_rel_err"] < 1e-4
