"""Stems: the backbone's own per modality (timm layout unchanged), or one the modality supplies (learned point
projection, station embedding), chosen by ``modalities.<m>.stem`` and checked when the config is read; multi-view
point clouds folded into the batch and max-pooled over views."""
import re

import numpy as np
import pytest
import timm
import torch

import uniperc  # noqa: F401  (registers the variants)
import uniperc.modalities as modalities
from uniperc.export import load as load_export
from uniperc.multimodal import MultiModalNet
from uniperc.modalities.point_cloud import LearnedProjection
from uniperc.modalities.weather import StationEmbedding
from uniperc.train import compose, resolve, run
from uniperc.train import loop
from uniperc.train.config import CONFIG_DIR

TINY = str(CONFIG_DIR / "tiny.yaml")
KWARGS = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "kernel_sizes": [3, 5, 5, 5]}
# adapter settings that fix C' without data (weather learns its variables from the data)
KNOWN_CHANNELS = {"weather": {"variables": ["t2m", "q"]}}


pytestmark = pytest.mark.usefixtures("module_data_cache")  # demo sets in a private folder, once per module


def tiny(modalities_, out, *overrides):
    return compose(modalities_, TINY, [f"output_dir={out}", "train.trackers=[]", *overrides])


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", modalities.list_modalities())
def test_default_stem_keeps_the_timm_layout(name):
    """Built from the stem factory, not a whole network per modality: still exactly the timm model's keys."""
    m = modalities.get(name)
    in_chans = m.in_chans(m.config(KNOWN_CHANNELS.get(name)))
    model = MultiModalNet("unireplknet_a", {name: {"in_chans": in_chans, "task": "classification", "num_outputs": 5}},
                          KWARGS)
    net = timm.create_model("unireplknet_a", in_chans=in_chans, num_classes=5, **KWARGS)
    assert _shapes(model.timm_state_dict(name)) == _shapes(net.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters())
    assert {k.split(".")[0] for k in model.state_dict()} == {"stems", "stages", "heads"}


def test_a_one_modality_model_starts_from_the_timm_models_weights():
    torch.manual_seed(0)
    model = MultiModalNet("unireplknet_a", {"audio": {"in_chans": 1, "task": "classification", "num_outputs": 5}},
                          KWARGS)
    torch.manual_seed(0)
    net = timm.create_model("unireplknet_a", in_chans=1, num_classes=0, **KWARGS)  # headless, as the trunk is built
    ours, timms = model.timm_state_dict("audio"), net.state_dict()
    assert all(torch.equal(ours[k], timms[k]) for k in timms if not k.startswith("head."))


@pytest.mark.parametrize("backbone", ["unireplknet_a", "uniconvnet_a", "pelk_t", "van_b0"])
def test_make_stem_is_the_variants_own_stem(backbone):
    kwargs = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "kernel_sizes": 5}
    net = timm.create_model(backbone, in_chans=5, num_classes=0, **kwargs)
    assert _shapes(net.make_stem(5).state_dict()) == _shapes(net.stem.state_dict())
    assert [type(m) for m in net.make_stem(5).modules()] == [type(m) for m in net.stem.modules()]


@pytest.mark.parametrize("name", modalities.list_modalities())
def test_each_modality_takes_auto_and_backbone_and_refuses_unknown_stems(name):
    assert resolve(tiny([name], "runs/x"))["modalities"][name]["stem"] == "auto"
    resolve(tiny([name], "runs/x", f"modalities.{name}.stem=backbone"))  # it reads every default input
    valid = ("auto", "backbone", *modalities.get(name).stems)
    with pytest.raises(ValueError, match=rf"modalities\.{name}\.stem must be one of " + re.escape(str(valid))):
        resolve(tiny([name], "runs/x", f"modalities.{name}.stem=nope"))


def test_a_stem_of_another_modality_is_refused_when_read_naming_its_owner():
    with pytest.raises(ValueError, match=r"modalities\.audio\.stem .*'learned_projection' is a stem of point_cloud"):
        resolve(tiny(["audio"], "runs/x", "modalities.audio.stem=learned_projection"))
    with pytest.raises(ValueError, match=r"modalities\.weather\.stem: 'station_embedding' .* the demo is a gridded"):
        resolve(tiny(["weather"], "runs/x", "modalities.weather.stem=station_embedding"))


def _watch_training(monkeypatch) -> dict:
    """Runs ``loop.fit`` as usual and keeps the trained model (``seen["model"]``) and its weights before training."""
    seen, fit = {}, loop.fit

    def watched(session):
        seen["before"] = {k: v.clone() for k, v in session.unwrapped.state_dict().items()}
        fit(session)
        seen["model"] = session.unwrapped

    monkeypatch.setattr(loop, "fit", watched)
    return seen


def test_points_train_end_to_end_through_the_learned_projection(tmp_path, monkeypatch):
    seen = _watch_training(monkeypatch)
    out = tmp_path / "points"
    # no weight decay: a weight that moved had a gradient
    result = run(tiny(["point_cloud"], out, "modalities.point_cloud.config.projection=points", "train.max_steps=2",
                      "train.weight_decay=0"))
    assert result["steps"] == 2
    model = seen["model"]
    projection, backbone_stem = model.stems["point_cloud"]
    assert isinstance(projection, LearnedProjection) and model.tasks["point_cloud"]["stem"] == "learned_projection"
    rgb = timm.create_model("unireplknet_a", in_chans=3, num_classes=0, **KWARGS).stem  # then the stem on 3 channels
    assert _shapes(backbone_stem.state_dict()) == _shapes(rgb.state_dict())
    for key in ("stems.point_cloud.0.mlp.0.weight", "stems.point_cloud.0.mlp.2.weight", "stems.point_cloud.0.mix.weight"):
        assert not torch.equal(seen["before"][key], model.state_dict()[key]), key
    # the export rebuilds the stem from its spec and gives the same outputs
    x = torch.randn(3, 6, 1, model.tasks["point_cloud"]["input_size"][1])
    with torch.no_grad():
        assert torch.allclose(load_export(out / "model")(x, "point_cloud"), model.eval()(x, "point_cloud"), atol=1e-5)
    with pytest.raises(ValueError, match="learned_projection' stem"):
        model.timm_state_dict("point_cloud")


def test_view_layout_batch_trains_and_is_invariant_to_the_order_of_the_views(tmp_path, monkeypatch):
    seen = _watch_training(monkeypatch)
    result = run(tiny(["point_cloud"], tmp_path / "views", "modalities.point_cloud.config.view_layout=batch",
                      "modalities.point_cloud.config.views=3", "train.max_steps=2"))
    assert result["steps"] == 2
    model = seen["model"].eval()
    assert model.input_shape("point_cloud") == (3, 2, 16, 16)  # views x (depth + shading) x H x W
    x = torch.rand(4, 3, 2, 16, 16)
    with torch.no_grad():
        out = model(x, "point_cloud")
        for order in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
            assert torch.allclose(model(x[:, order], "point_cloud"), out, atol=1e-5), order
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # ... and it does read the views
        single = x.clone()
        single[:, 0] = 0  # view 0 is a blank image: the output changes, so each view is seen
        assert not torch.allclose(model(single, "point_cloud"), out, atol=1e-5)
    with pytest.raises(ValueError, match=r"B x 3 x 2 x H x W"):
        model(x[:, 0], "point_cloud")


def test_views_are_refused_for_a_dense_head():
    spec = {"in_chans": 2, "task": "regression", "num_outputs": 2 * 8 * 8, "head": "dense", "target_shape": [2, 8, 8],
            "views": 3}
    with pytest.raises(ValueError, match="dense head .* 3 views"):
        MultiModalNet("unireplknet_a", {"weather": spec}, KWARGS)


def _station_archive(folder, stations: int = 10, steps: int = 80):
    import xarray as xr

    rng = np.random.default_rng(0)
    folder.mkdir()
    ds = xr.Dataset({v: (("time", "station"), rng.normal(size=(steps, stations)).astype(np.float32))
                     for v in ("temp", "wind")},
                    coords={"time": np.arange(steps), "station": np.arange(stations)})
    ds.to_netcdf(folder / "stations.nc")
    return folder


def test_station_data_trains_through_the_station_embedding(tmp_path, monkeypatch):
    seen = _watch_training(monkeypatch)
    path = _station_archive(tmp_path / "stations")
    result = run(tiny(["weather"], tmp_path / "run", "modalities.weather.source=folder",
                      f"modalities.weather.path={path}", "train.max_steps=2", "train.weight_decay=0"))
    assert result["steps"] == 2
    model = seen["model"]
    embedding = model.stems["weather"][0]
    assert isinstance(embedding, StationEmbedding) and model.tasks["weather"]["stem"] == "station_embedding"
    assert embedding.proj.in_channels == 2 * 2 and embedding.mask.shape[-2:] == (4, 4)  # 2 vars x history 2, 10 -> 4x4
    key = "stems.weather.0.proj.weight"
    assert not torch.equal(seen["before"][key], model.state_dict()[key])
    # the backbone's own stem still reads station grids where asked for
    run(tiny(["weather"], tmp_path / "plain", "modalities.weather.source=folder",
             f"modalities.weather.path={path}", "modalities.weather.stem=backbone", "train.max_steps=1"))
    assert seen["model"].tasks["weather"]["stem"] == "backbone"


def test_a_station_embedding_for_gridded_data_is_refused_before_the_model_is_built(tmp_path):
    """Whether a folder holds stations is known once it is opened: refused then, naming the key."""
    root = modalities.get("weather").ensure_demo(seed=0, days=6, nlat=8, nlon=16)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"modalities\.weather\.stem: 'station_embedding' .* this data is a gridded"):
        run(tiny(["weather"], out, "modalities.weather.source=folder", f"modalities.weather.path={root}",
                 "modalities.weather.stem=station_embedding"))
    assert not out.exists()


@pytest.mark.parametrize("setting", [{"view_layout": "batch", "views": 3}, {"projection": "points", "num_points": 64}])
def test_modality_stems_and_views_export_to_onnx(tmp_path, setting):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from uniperc.export import export_onnx_modalities

    m = modalities.get("point_cloud")
    cfg = m.config(image_size=16, **setting)
    spec = {"in_chans": m.in_chans(cfg), "input_size": list(m.input_size(cfg)), "task": "classification",
            "num_outputs": 4, "adapter_config": cfg, "stem": m.stem_for(cfg), "views": m.views(cfg)}
    model = MultiModalNet("unireplknet_a", {"point_cloud": spec}, KWARGS).eval()
    export_onnx_modalities(model, tmp_path)
    x = torch.rand(3, *model.input_shape("point_cloud"))
    out = ort.InferenceSession(str(tmp_path / "point_cloud.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(out, model(x, "point_cloud").numpy(), atol=1e-4)
