"""The benchmarks report the models they timed: exact parameter counts, the deploy form, only the mixer swapped."""
import pytest
import timm
import torch

import uniperc
from uniperc.bench.backbone import measure


def _count(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.fixture
def one_thread():
    """The timing comparisons below on one intra-op thread: with two, every small op waits at an OpenMP barrier
    for a thread a loaded machine may not be running (2 test workers on 2 cores), and the deploy form's many
    small ops were measured 10x slower than the train step that way."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_backbone_benchmark_reports_the_model_it_timed(one_thread):
    # median of 3: one stall of a loaded machine cannot flip the order below
    r = measure("unireplknet_a", batch=2, size=32, repeats=3, device="cpu")
    model = timm.create_model("unireplknet_a", num_classes=1000)
    assert r["params_M"] == _count(model)
    assert r["deploy_params_M"] == _count(uniperc.reparameterize(model.eval())) < r["params_M"]
    assert r["train"] < r["eval"]  # forward + backward + AdamW cannot be faster than the forward alone


def test_mixer_benchmark_swaps_only_the_mixer(one_thread):
    from uniperc.bench.mixers import build, count_flops, measure as measure_mixer

    depths, dims = (1, 1, 1, 1), (16, 32, 64, 128)
    rows = {m: measure_mixer(m, depths, dims, batch=2, size=32, repeats=3, device="cpu")  # median: see above
            for m in ("dilated_reparam", "peripheral", "lka", "rfa")}
    frames = set()
    for mixer, r in rows.items():
        torch.manual_seed(0)
        model = build(mixer, depths, dims)
        assert r["params_M"] == _count(model), mixer
        deployed = uniperc.reparameterize(model.eval())
        assert r["deploy_params_M"] == _count(deployed), mixer
        assert r["gflops"] == pytest.approx(count_flops(deployed, torch.randn(1, 3, 32, 32)) / 2e9), mixer
        assert r["train_img_s"] < r["deploy_img_s"], mixer
        # the frame (stem, downsamples, head) is the same for every mixer: only the blocks (and state a mixer
        # shares across a stage's blocks, PeLK's positional embedding) differ
        frames.add(tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()
                         if ".blocks." not in k and ".shared." not in k))
    assert len(frames) == 1
    assert rows["dilated_reparam"]["deploy_params_M"] < rows["dilated_reparam"]["params_M"]


def test_recipes_table_smoke(tmp_path):
    """``bench recipes`` on tiny settings: a row per modality with its baselines, written as markdown."""
    from uniperc.bench.recipes import main

    out = tmp_path / "results.md"
    rows = main(["--only", "image,weather", "--config", "configs/tiny.yaml", "--runs", str(tmp_path / "runs"),
                 "--output", str(out), "--set", "train.max_steps=2"])
    assert [r["modality"] for r in rows] == ["image", "weather"]
    assert rows[0]["baselines"].keys() == {"chance", "majority"} and rows[0]["classes"] == 10
    assert rows[1]["baselines"].keys() == {"persistence", "climatology"} and rows[1]["metric"] == "test mse"
    assert (tmp_path / "runs" / "image" / "metrics.json").exists() and (tmp_path / "runs" / "weather").is_dir()
    text = out.read_text()
    assert "| image | image | classification |" in text and "persistence" in text


def test_recipes_rejects_unknown_names():
    from uniperc.bench.recipes import parse_args

    with pytest.raises(ValueError, match="unknown recipe.*'imgae'"):
        parse_args(["--only", "imgae"])
