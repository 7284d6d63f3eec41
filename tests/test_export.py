"""Export in deploy form: uniperc.load and timm's pretrained path rebuild models with the same outputs."""
import json

import pytest
import timm
import torch

import uniperc
from uniperc.export import export, timm_model
from uniperc.multimodal import MultiModalNet

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(3, 5, 7, 5))
TASKS = {"audio": dict(in_chans=1, task="classification", num_outputs=5, output_names=list("abcde")),
         "image": dict(in_chans=3, task="multilabel", num_outputs=4)}


def _trained_like(model):
    """Random BatchNorm statistics (each modality's own, where the shared stages keep them per modality) and
    affine terms, so that folding them is not a no-op."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for suffix in ["", *(f"_{name}" for name in model.tasks if hasattr(m, f"running_mean_{name}"))]:
                getattr(m, f"running_mean{suffix}").copy_(torch.randn(m.num_features, generator=g) * 0.1)
                getattr(m, f"running_var{suffix}").copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_multimodal_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(MultiModalNet("unireplknet_a", TASKS, TINY))
    xa, xi = torch.randn(2, 1, 32, 24), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(xa, "audio"), model(xi, "image")
    export(model, tmp_path)
    loaded = uniperc.load(tmp_path)
    # BatchNorm statistics per modality: the joint net is stored in train form, each modality deploys on its own
    assert json.loads((tmp_path / "uniperc.json").read_text())["deploy"] is False and loaded.norm_stats_per_modality
    with torch.no_grad():
        out = loaded(xa, "audio"), loaded(xi, "image")
        deployed = loaded.deploy_copy("audio")(xa, "audio"), loaded.deploy_copy("image")(xi, "image")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.deploy_copy("audio").stages.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.stages.modules())  # the original is untouched
    for a, b, c in zip(out, deployed, ref):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4)
    assert loaded.tasks["audio"]["output_names"] == list("abcde") and loaded.heads["image"].task.name == "multilabel"
    assert not (tmp_path / "config.json").exists()  # two stems: not one timm model


def test_single_modality_export_loads_in_timm(tmp_path):
    torch.manual_seed(1)
    model = _trained_like(MultiModalNet("unireplknet_a", {"audio": TASKS["audio"]}, TINY))
    x = torch.randn(3, 1, 32, 24)
    with torch.no_grad():
        ref = model(x, "audio")
    export(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())  # timm's layout (timm.models.save_for_hf)
    assert config["architecture"] == "unireplknet_a" and config["label_names"] == list("abcde")
    assert config["model_args"]["dims"] == list(TINY["dims"]) and config["model_args"]["in_chans"] == 1
    net = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert isinstance(net, uniperc.UniPercNet)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(timm_model(tmp_path)(x), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uniperc.load(tmp_path)(x, "audio"), ref, atol=1e-5, rtol=1e-4)


def test_load_rejects_non_export_dirs(tmp_path):
    with pytest.raises(ValueError, match="not a uniperc export"):
        uniperc.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format"):
        uniperc.load(tmp_path)


@pytest.mark.parametrize("name, kwargs", [
    ("uniconvnet_a", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))),
    ("pelk_t", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(7, 7, 7, 7))),
    ("van_b0", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))),
])
def test_every_family_serves_as_shared_backbone_and_exports(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = _trained_like(MultiModalNet(name, TASKS, kwargs))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, "image")
    assert ref.shape == (2, 4)
    export(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(uniperc.load(tmp_path)(x, "image"), ref, atol=1e-5, rtol=1e-4)


def test_dense_head_exports_and_loads(tmp_path):
    torch.manual_seed(0)
    field = dict(in_chans=5, task="regression", num_outputs=2 * 12 * 20, output_names=["a", "b"], head="dense",
                 target_shape=[2, 12, 20], residual_channels=[1, 3])
    model = _trained_like(MultiModalNet("unireplknet_a", {"weather": field, "audio": TASKS["audio"]}, TINY))
    torch.nn.init.normal_(model.heads["weather"].out.weight, std=0.1)  # a decoder that does something
    x = torch.randn(2, 5, 12, 20)
    with torch.no_grad():
        ref = model(x, "weather")
    assert not torch.allclose(ref, x[:, [1, 3]].flatten(1), atol=1e-3)
    export(model, tmp_path / "both")
    loaded = uniperc.load(tmp_path / "both")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, "weather"), ref, atol=1e-5, rtol=1e-4)
    assert set(model.timm_state_dict("audio")) >= {"head.fc.weight", "stem.0.weight"}  # pooled heads keep it
    with pytest.raises(ValueError, match="dense head"):
        model.timm_state_dict("weather")
    export(MultiModalNet("unireplknet_a", {"weather": field}, TINY), tmp_path / "one")
    assert not (tmp_path / "one" / "config.json").exists()
    with pytest.raises(ValueError, match="dense head"):
        timm_model(tmp_path / "one")
