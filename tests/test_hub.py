"""timm's Hub layout (config.json + model.safetensors): local-dir round trips, official weights through
pretrained=True, and refused folders. Offline: local folders and files only."""
import copy
import json
import runpy
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg

import uniperc
from conftest import load_reference_keys, random_state_dict, randomize_bn_and_scales

SMALL = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
FAMILIES = [
    ("unireplknet_a", dict(SMALL, kernel_sizes=(3, 5, 7, 5))),
    ("uniconvnet_a", SMALL),
    ("pelk_t", dict(SMALL, kernel_sizes=(7, 7, 7, 7))),
    ("van_b0", SMALL),
]


def _same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("deploy", [False, True], ids=["train_form", "deploy_form"])
@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_local_dir_round_trip(tmp_path, name, kwargs, deploy):
    model = randomize_bn_and_scales(timm.create_model(name, num_classes=5, in_chans=2, **kwargs)).eval()
    if deploy:
        uniperc.reparameterize(model)
    uniperc.save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == name and config["model_args"]["dims"] == list(SMALL["dims"])
    x = torch.randn(2, 2, 32, 32)
    for loaded in (timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval(), uniperc.load(tmp_path)):
        assert set(loaded.state_dict()) == set(model.state_dict())  # the form it was saved in
        _same_outputs(loaded, model, x)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny training run on audio (one modality, pooled head) with its deploy-form export in ``model/``."""
    from uniperc.train import compose, run
    from uniperc.train.config import CONFIG_DIR

    out = tmp_path_factory.mktemp("run") / "audio"
    run(compose(["audio"], str(CONFIG_DIR / "tiny.yaml"),
                [f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2"]))
    return out


def test_trained_export_loads_through_local_dir_and_uniperc_load(trained_run):
    from uniperc.predict import load_any
    from uniperc.runs import latest

    trained, _ = load_any(latest(trained_run))  # the train-form checkpoint the export was made from
    export_dir = trained_run / "model"
    spec = trained.tasks["audio"]
    x = torch.randn(3, spec["in_chans"], *spec["input_size"])
    with torch.no_grad():
        ref = trained(x, "audio")
    net = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    assert isinstance(net, uniperc.UniPercNet) and net.pretrained_cfg["source"] == "local-dir"
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uniperc.load(export_dir)(x, "audio"), ref, atol=1e-5, rtol=1e-4)
    config = json.loads((export_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [spec["in_chans"], *spec["input_size"]]
    assert config["label_names"] == spec["output_names"]


def test_cli_writes_one_modality_as_a_timm_folder(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uniperc.export", "--checkpoint", str(trained_run),
                                      "--output", str(tmp_path / "hub"), "--modality", "audio"])
    runpy.run_module("uniperc.export", run_name="__main__")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["config.json", "model.safetensors"]
    exported = uniperc.load(trained_run / "model")
    x = torch.randn(2, exported.tasks["audio"]["in_chans"], *exported.tasks["audio"]["input_size"])
    net = uniperc.load(tmp_path / "hub")
    assert isinstance(net, uniperc.UniPercNet)
    with torch.no_grad():
        torch.testing.assert_close(net(x), exported(x, "audio"), atol=1e-5, rtol=1e-4)


def test_version_1_export_still_loads(tmp_path):
    """Folders written before the Hub layout: the spec in config.json, MultiModalNet keys in model.safetensors."""
    from uniperc.multimodal import MultiModalNet

    tasks = {"audio": dict(in_chans=1, task="classification", num_outputs=3)}
    model = randomize_bn_and_scales(MultiModalNet("unireplknet_a", tasks, FAMILIES[0][1])).eval()
    save_file(uniperc.reparameterize(copy.deepcopy(model)).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"format": "uniperc.multimodal", "version": 1, "deploy": True, "backbone": "unireplknet_a",
         "backbone_kwargs": FAMILIES[0][1], "tasks": tasks}, default=list))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(uniperc.load(tmp_path)(x, "audio"), model(x, "audio"), atol=1e-5, rtol=1e-4)


# ---- published variants name their official weights; pretrained=True converts official-format files ----

# reference key list, converter family, key the official files nest their weights under
OFFICIAL = {
    "unireplknet_a": ("unireplknet_a.keys.txt", "unireplknet", "model"),
    "uniconvnet_a": ("uniconvnet_a.keys.txt", "uniconvnet", "model"),
    "van_b0": ("van_b0.keys.txt", "van", "state_dict"),
}


@pytest.mark.parametrize("name", timm.list_models(["unireplknet_*", "uniconvnet_*", "van_b*", "pelk_*"]))
def test_published_variants_name_official_weights(name):
    cfg = get_pretrained_cfg(name)
    if name.startswith("pelk"):
        assert not (cfg.url or cfg.hf_hub_id)  # no official release
    else:
        assert cfg.url.startswith("https://huggingface.co/") or (cfg.hf_hub_id and cfg.hf_hub_filename), cfg


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_format_file_through_pretrained_true(tmp_path, name):
    keys, family, nest = OFFICIAL[name]
    official = random_state_dict(load_reference_keys(keys), seed=5)
    path = tmp_path / f"{name}_official.pth"
    torch.save({nest: official}, path)  # nested as the official files are
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    reference = uniperc.load_converted(timm.create_model(name), official, family).eval()
    _same_outputs(model, reference, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_format_file_fine_tunes_to_other_classes_and_channels(tmp_path, name):
    """timm adapts the classifier and the first conv after the filter, so the filter lets those two differ."""
    keys, family, nest = OFFICIAL[name]
    official = random_state_dict(load_reference_keys(keys), seed=6)
    path = tmp_path / f"{name}_official.pth"
    torch.save({nest: official}, path)
    own = timm.create_model(name, pretrained=True, num_classes=7, in_chans=1,
                            pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    reference = uniperc.load_converted(timm.create_model(name), official, family).state_dict()
    assert own["head.fc.weight"].shape[0] == 7
    torch.testing.assert_close(own["stem.0.weight"], reference["stem.0.weight"].sum(1, keepdim=True))
    assert all(torch.equal(v, reference[k]) for k, v in own.items() if k.startswith("stages."))


# ---- refused folders ----

def _saved(tmp_path):
    uniperc.save_for_hf(timm.create_model("van_b0", num_classes=4, **SMALL), tmp_path)


def test_unknown_model_is_named(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = "van_b9_nope"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="van_b9_nope"):
        uniperc.load(tmp_path)
    (tmp_path / "uniperc.json").write_text(json.dumps(
        {"format": "uniperc.multimodal", "version": 2, "backbone": "van_b9_nope", "backbone_kwargs": {},
         "tasks": {"image": dict(in_chans=3, task="classification", num_outputs=4)}}))
    with pytest.raises(ValueError, match="van_b9_nope"):  # an export's spec naming it
        uniperc.load(tmp_path)


def test_mismatched_weights_name_the_keys(tmp_path):
    _saved(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["stages.1.blocks.0.mlp.fc1.weight"]
    state["stages.9.bogus"] = torch.zeros(1)
    state["head.fc.weight"] = torch.zeros(7, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    for load in (uniperc.load, lambda d: timm.create_model(f"local-dir:{d}", pretrained=True)):
        with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.mlp\.fc1\.weight") as err:
            load(tmp_path)
        assert "stages.9.bogus" in str(err.value) and "head.fc.weight" in str(err.value)


def test_mismatched_export_weights_name_the_keys(tmp_path):
    from uniperc.export import export
    from uniperc.multimodal import MultiModalNet

    tasks = {"audio": dict(in_chans=1, task="classification", num_outputs=3),
             "image": dict(in_chans=3, task="classification", num_outputs=2)}
    export(MultiModalNet("van_b0", tasks, SMALL), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["heads.image.fc.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"heads\.image\.fc\.bias"):
        uniperc.load(tmp_path)
