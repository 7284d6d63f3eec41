"""Training: configuration checks, batch interleaving, tiny end-to-end runs per modality and jointly."""
import json
import math

import pytest
import torch

import uniperc.heads
from uniperc.train import NonFiniteLossError, apply_overrides, compose, resolve, run
from uniperc.runs import MARKER, latest
from uniperc.train.config import CONFIG_DIR
from uniperc.train.data import schedule

TINY = str(CONFIG_DIR / "tiny.yaml")
MODALITIES = ["image", "audio", "point_cloud", "weather", "video"]


pytestmark = pytest.mark.usefixtures("module_data_cache")  # demo sets in a private folder, once per module


def tiny(modalities, out, *overrides):
    return compose(modalities, TINY, [f"output_dir={out}", *overrides])


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.interleave=random", "train.interleave"),
    ("train.lrr=0.1", "train.lrr"),
    ("modalities.image.batch_size=0", "modalities.image.batch_size"),
    ("modalities.image.config.image_size=2", "image_size"),
    ("modalities.image.config.colour=1", "colour"),
    ("model.backbone=resnet_nope", "model.backbone"),
    ("model.mixer=nope", "model.mixer"),
    ("train.ema.decay=2", "train.ema.decay"),
    ("modalities.image.head=dense", "modalities.image.head"),
    ("modalities.image.head=conv", "modalities.image.head"),
    ("modalities.image.residual=maybe", "modalities.image.residual"),
    ("modalities.image.mixup=-0.1", "modalities.image.mixup"),
])
def test_invalid_values_fail_before_training_naming_the_key(tmp_path, override, key):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(tiny(["image"], out, override))
    assert not out.exists()  # nothing was written, let alone trained


def test_mixup_is_refused_for_a_task_whose_loss_cannot_take_it(tmp_path):
    """Weather's forecast loss (masked MSE) is not linear in its target: mixup there is a config error."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"modalities\.weather\.mixup: .*does not support mixup"):
        run(tiny(["weather"], out, "modalities.weather.mixup=0.4"))
    assert not out.exists()


def test_mixup_trains_and_changes_what_the_model_sees(tmp_path):
    """Two steps with and without ``modalities.image.mixup``, same seed: both train, and the logged losses differ
    (the mixed batches and the blended loss are really used)."""
    losses = {}
    for alpha in (0.0, 0.4):
        result = run(tiny(["image"], tmp_path / f"a{alpha}", f"modalities.image.mixup={alpha}", "train.max_steps=2",
                          "train.log_every=1"))
        losses[alpha] = [h["loss"] for h in result["history"] if h["kind"] == "train"]
        assert len(losses[alpha]) == 2 and all(math.isfinite(v) for v in losses[alpha])
    assert losses[0.0] != losses[0.4]


def test_compose_and_overrides():
    cfg = compose(["audio", "image"], None, ["train.lr=5e-4", "model.kwargs.dims=[8,16,32,64]"])
    assert set(cfg["modalities"]) == {"audio", "image"}
    assert cfg["train"]["lr"] == 5e-4 and cfg["model"]["kwargs"]["dims"] == [8, 16, 32, 64]
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    resolved = resolve(compose(["audio"], None))
    assert resolved["modalities"]["audio"]["config"]["n_mels"] == 40  # configs/audio.yaml over the demo preset


class _Draws(torch.utils.data.Dataset):
    """Each sample is a random draw, as an augmentation makes one."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"inputs": torch.rand(2), "labels": torch.tensor(i)}


def test_persistent_workers_see_each_new_epoch():
    """Loader workers live across epochs; SeededAugment's epoch is shared with them, so every epoch draws anew and
    exactly what an in-process loader draws for that epoch."""
    from uniperc.data import make_loader
    from uniperc.train.data import SeededAugment

    draws = {}
    for workers in (0, 1):
        data = SeededAugment(_Draws(), seed=3)
        loader = make_loader(data, 3, False, 0, workers)
        assert loader.persistent_workers == (workers > 0)
        epochs = []
        for epoch in range(3):
            data.set_epoch(epoch)
            epochs.append(torch.cat([b["inputs"] for b in loader]))
        draws[workers] = epochs
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not torch.equal(draws[1][0], draws[1][1]) and not torch.equal(draws[1][1], draws[1][2])


def test_schedule_round_robin_and_proportional():
    lengths = {"a": 3, "b": 1, "c": 2}
    assert schedule(lengths, "round_robin", 0, 0) == ["a", "b", "c", "a", "c", "a"]
    p0 = schedule(lengths, "proportional", 7, 3)
    assert sorted(p0) == sorted(["a"] * 3 + ["b"] + ["c"] * 2)
    assert p0 == schedule(lengths, "proportional", 7, 3)  # a function of (seed, epoch): same on every process
    assert any(schedule({"a": 20, "b": 20}, "proportional", 7, e) != schedule({"a": 20, "b": 20}, "proportional", 7, 0)
               for e in range(1, 4))


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_end_to_end(tmp_path, modality):
    result = run(tiny([modality], tmp_path / modality))
    test = result["metrics"]["test"][modality]
    assert test and all(math.isfinite(v) for v in test.values())
    out = tmp_path / modality
    for name in ("training_curves.png", "metrics.csv", "metrics.json", "model/model.safetensors", "model/uniperc.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,name,value" and any(f"train/{modality}/loss" in r for r in rows[1:])
    assert result["steps"] == 4 and (latest(out) / MARKER).is_file()
    baselines = json.loads((out / "metrics.json").read_text())["baselines"]["test"][modality]
    expected = {"persistence", "climatology"} if modality == "weather" else {"chance", "majority"}
    assert set(baselines) == expected and all(math.isfinite(v) for b in baselines.values() for v in b.values())


def test_joint_training_interleaves_all_modalities(tmp_path):
    mods = ["audio", "image", "point_cloud"]
    result = run(tiny(mods, tmp_path / "joint", "train.max_steps=6", "train.interleave=round_robin"))
    assert set(result["metrics"]["test"]) == set(mods)
    trained = [h["modality"] for h in result["history"] if h["kind"] == "train"]
    assert trained == mods * 2  # round robin, log_every=1
    spec = json.loads((tmp_path / "joint" / "model_spec.json").read_text())
    assert {m: spec["tasks"][m]["in_chans"] for m in mods} == {"audio": 1, "image": 3, "point_cloud": 4}


def test_bf16_ema_and_gradient_accumulation(tmp_path):
    result = run(tiny(["image"], tmp_path / "r", "train.mixed_precision=bf16", "train.ema.enabled=true",
                      "train.grad_accum=2", "train.max_steps=4"))
    state = json.loads((latest(tmp_path / "r") / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["updates"] == 2  # one optimizer update per two batches
    assert math.isfinite(result["metrics"]["test"]["image"]["loss"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = uniperc.heads.TaskHead.loss
    calls = {"n": 0}

    def loss(self, logits, labels):
        calls["n"] += 1
        value = real_loss(self, logits, labels)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(uniperc.heads.TaskHead, "loss", loss)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*'image' batch"):
        run(tiny(["image"], tmp_path / "r", "train.checkpoint_every=2"))
    good = latest(tmp_path / "r")
    assert good.name == "step_00000002"
    state = torch.load(good / "random_states_0.pkl", weights_only=False)  # a complete Accelerate state
    assert "torch_manual_seed" in state


def test_evaluate_and_predict_reproduce_the_trained_model(tmp_path):
    import uniperc.modalities as modalities
    from uniperc.evaluate import evaluate_checkpoint
    from uniperc.predict import load_any, main as predict_main, predict_files

    result = run(tiny(["image"], tmp_path / "r"))
    again = evaluate_checkpoint(tmp_path / "r", split="test")  # through the exported deploy-form model
    for key, value in result["metrics"]["test"]["image"].items():
        assert again["image"][key] == pytest.approx(value, abs=1e-3), key
    report = json.loads((tmp_path / "r" / "eval_image_test.json").read_text())
    assert sum(map(sum, report["confusion_matrix"])) == report["samples"]
    assert (tmp_path / "r" / "confusion_image_test.png").stat().st_size > 1000

    root = modalities.get("image").ensure_demo(seed=0, n_per_class=6)  # the same files, read as a plain folder
    again = evaluate_checkpoint(tmp_path / "r", split="test", source="folder", path=str(root), output=tmp_path / "ev")
    assert again["image"]["top1"] == pytest.approx(result["metrics"]["test"]["image"]["top1"], abs=1e-3)
    assert (tmp_path / "ev" / "eval_image_test.json").is_file()

    files = sorted((root / "test").rglob("*.png"))[:3]
    model, _ = load_any(tmp_path / "r" / "checkpoints" / latest(tmp_path / "r").name)  # train-form checkpoint
    rows = predict_files(model, files)
    names = model.tasks["image"]["output_names"]
    for f, row in zip(files, rows):
        x = modalities.get("image").read_file(f, model.tasks["image"]["adapter_config"])
        with torch.no_grad():
            probs = model(x[None], "image").softmax(-1)[0]
        assert row["top"][0]["label"] == names[int(probs.argmax())]
        assert row["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    with pytest.raises(ValueError, match="extension"):
        predict_files(model, [tmp_path / "r" / "metrics.json"])
    predict_main(["--checkpoint", str(tmp_path / "r"), str(files[0])])  # the CLI path, on the export


def test_weather_dense_head_evaluates_predicts_and_reports_baselines(tmp_path):
    import uniperc.modalities as modalities
    from uniperc.modalities.weather import open_xarray
    from uniperc.evaluate import evaluate_checkpoint
    from uniperc.heads import DenseHead
    from uniperc.predict import load_any, predict_files

    result = run(tiny(["weather"], tmp_path / "r"))
    model, config = load_any(tmp_path / "r")  # the deploy-form export
    spec = model.tasks["weather"]
    assert isinstance(model.heads["weather"], DenseHead) and spec["head"] == "dense" and "timm" not in config
    assert spec["residual_channels"] == [1, 3]  # (q, t2m) x history 2: each variable's newest step
    again = evaluate_checkpoint(tmp_path / "r", split="test")
    for key, value in result["metrics"]["test"]["weather"].items():
        assert again["weather"][key] == pytest.approx(value, abs=1e-5), key
    report = json.loads((tmp_path / "r" / "eval_weather_test.json").read_text())
    trained = result["baselines"]["test"]["weather"]
    assert set(report["baselines"]) == {"persistence", "climatology"} == set(trained)
    for name, metrics in trained.items():
        assert report["baselines"][name] == pytest.approx(metrics), name
    assert trained["persistence"]["mse"] < trained["climatology"]["mse"]  # an hour changes little

    m = modalities.get("weather")
    root = m.ensure_demo(seed=0, days=6, nlat=8, nlon=16)  # tiny.yaml's demo set (cached)
    open_xarray(root).isel(time=slice(-3, None)).to_netcdf(tmp_path / "latest.nc")
    row = predict_files(model, [tmp_path / "latest.nc"])[0]
    x = m.read_file(tmp_path / "latest.nc", spec["adapter_config"])
    with torch.no_grad():
        expected = model(x[None], "weather")[0]
    assert len(row["outputs"]) == 2 * 8 * 16 and row["outputs"] == pytest.approx(expected.tolist(), abs=1e-6)


def test_head_choice_follows_the_task_and_names_the_key():
    from uniperc.data import _head_choice

    assert _head_choice("weather", "auto", None, (2, 8, 16), [3, 7]) == ("dense", [3, 7])  # a field target
    assert _head_choice("weather", "auto", None, None, [3, 7]) == ("pooled", None)  # station rows: not a field
    assert _head_choice("weather", "dense", False, (2, 8, 16), [3, 7]) == ("dense", None)
    with pytest.raises(ValueError, match=r"modalities\.weather\.head"):
        _head_choice("weather", "dense", None, None, [3, 7])
    with pytest.raises(ValueError, match=r"modalities\.weather\.residual"):
        _head_choice("weather", "pooled", True, (2, 8, 16), [3, 7])


def test_extra_evaluation_split_is_scored_with_baselines_after_training(tmp_path):
    """A ``test_<name>`` split (audio's test_festival, here a folder's test_other_list.txt) is evaluated and
    reported with its baselines, and the summary names each task's kind and classes."""
    import numpy as np
    import soundfile as sf

    data = tmp_path / "clips"
    for y, label in enumerate(("high", "low")):
        (data / label).mkdir(parents=True)
        for spk in range(24):
            t = np.arange(1600) / 16000
            sf.write(data / label / f"s{spk}_nohash_0.wav", np.sin(2 * np.pi * (300 + 900 * y) * t), 16000)
    (data / "test_other_list.txt").write_text("high/s0_nohash_0.wav\nlow/s1_nohash_0.wav\nlow/s2_nohash_0.wav\n")
    result = run(tiny(["audio"], tmp_path / "run", "modalities.audio.source=folder", f"modalities.audio.path={data}"))
    assert list(result["metrics"]) == ["validation", "test", "test_other"]
    assert set(result["baselines"]["test_other"]["audio"]) == {"chance", "majority"}
    assert result["tasks"] == {"audio": {"task": "classification", "num_outputs": 2}}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(saved["metrics"]["test_other"]["audio"]["top1"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """Each recipe the README names composes and passes every check (model built on the meta device)."""
    import yaml

    names = list(yaml.safe_load(path.read_text())["modalities"])
    cfg = compose(names, str(path), [])
    assert list(cfg["modalities"]) == names


def test_repeat_passes_over_a_split_several_times_per_epoch_and_resumes_inside_a_pass(tmp_path):
    """``modalities.<m>.repeat: 2``: an epoch holds two differently shuffled and augmented passes over the split
    (twice the batches in the schedule); a resumed epoch continues inside the second pass exactly; ``repeat: 1`` is
    the plain epoch (the loader at that epoch)."""
    from uniperc.train import loop

    def batches(it):
        return [(b["inputs"].clone(), b["labels"].clone()) for b in it]

    s = loop.setup(resolve(tiny(["image"], tmp_path / "r2", "modalities.image.repeat=2")))
    n = len(s.train_loaders["image"])
    assert s.lengths == {"image": 2 * n} and s.total_steps == 4  # max_steps still caps the run
    full = batches(loop._passes(s, "image", 1, 0))
    assert len(full) == 2 * n
    first, second = full[:n], full[n:]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # another shuffle / augmentation
    loader = s.train_loaders["image"]
    for k, part in ((0, first), (1, second)):  # pass k of epoch 1 is loader epoch 1 * 2 + k
        s.train_sets["image"].set_epoch(2 + k)
        loader.set_epoch(2 + k)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(part, batches(loader)))
    resumed = batches(loop._passes(s, "image", 1, n + 1))
    assert len(resumed) == n - 1 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                         for a, b in zip(resumed, full[n + 1:]))

    s1 = loop.setup(resolve(tiny(["image"], tmp_path / "r1")))
    assert s1.lengths == {"image": n}
    passed = batches(loop._passes(s1, "image", 3, 0))
    plain = s1.train_loaders["image"]
    s1.train_sets["image"].set_epoch(3)
    plain.set_epoch(3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(passed, batches(plain)))
    with pytest.raises(ValueError, match=r"modalities\.image\.repeat"):
        resolve(tiny(["image"], tmp_path / "r0", "modalities.image.repeat=0"))
