"""Effective receptive field analyser (uniperc.erf): exact supports, Gaussian stacks, area ratios, CLI."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from uniperc import erf


def _avg_stack(n: int) -> nn.Sequential:
    """n linear 3x3 box filters: the ERF is the n-fold convolution of a 3x3 box (a 2-D binomial)."""
    layers = []
    for _ in range(n):
        conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(conv.weight, 1 / 9)
        layers.append(conv)
    return nn.Sequential(*layers)


def test_single_conv_erf_is_exactly_its_support():
    torch.manual_seed(0)
    model = nn.Conv2d(2, 8, 3, padding=1)
    raw = erf.erf_map(model, torch.randn(6, 2, 15, 15))
    support = raw > 0
    expected = np.zeros((15, 15), bool)
    expected[6:9, 6:9] = True
    np.testing.assert_array_equal(support, expected)


def test_single_conv_erf_matches_hand_computed_gradient():
    """With 1 input/1 output channel and a positive input, ds/dx at the 3x3 window is the kernel itself."""
    model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0], [2.0, 0.0, 1.5]])
    model.weight.data.copy_(w.view(1, 1, 3, 3))
    x = torch.rand(3, 1, 9, 9) + 0.1
    x[:, :, 3:6, 3:6] = 1.0  # keeps the centre output positive, so ReLU(score) passes the gradient
    relu_map = erf.erf_map(model, x)
    abs_map = erf.erf_map(model, x, grad_mode="abs")
    np.testing.assert_allclose(relu_map[3:6, 3:6], w.clamp(min=0).numpy(), atol=1e-6)
    np.testing.assert_allclose(abs_map[3:6, 3:6], w.abs().numpy(), atol=1e-6)
    assert relu_map.sum() == pytest.approx(float(w.clamp(min=0).sum()), abs=1e-5)


def test_box_stack_erf_is_gaussian_with_binomial_sigma():
    n = 8
    res = erf.analyse_erf(_avg_stack(n), torch.rand(2, 1, 41, 41) + 0.5)
    g = res.gaussian
    assert g["r2"] > 0.995
    expected_sigma = math.sqrt(n * 2 / 3)  # variance of one 3-tap box is 2/3 per axis
    assert g["sigma_y"] == pytest.approx(expected_sigma, rel=0.05)
    assert g["sigma_x"] == pytest.approx(expected_sigma, rel=0.05)
    assert (g["center_y"], g["center_x"]) == (pytest.approx(20, abs=0.05), pytest.approx(20, abs=0.05))


def test_random_relu_conv_stack_is_close_to_gaussian_but_a_box_is_not():
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1)]
    for _ in range(9):
        layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    deep = erf.analyse_erf(nn.Sequential(*layers), torch.randn(16, 1, 41, 41))
    assert deep.gaussian["r2"] > 0.9  # fitted on |grad|
    assert erf.gaussian_fit(deep.raw)["r2"] < 0.8  # the sign-clipped ReLU map is speckled
    box = np.zeros((41, 41))
    box[10:31, 10:31] = 1.0
    assert erf.gaussian_fit(box)["r2"] < deep.gaussian["r2"]


def test_gaussian_fit_recovers_known_sigmas():
    y, x = np.mgrid[0:61, 0:81]
    z = 3.0 * np.exp(-((y - 28) ** 2 / (2 * 4.0 ** 2) + (x - 45) ** 2 / (2 * 9.0 ** 2)))
    g = erf.gaussian_fit(z)
    assert g["r2"] == pytest.approx(1.0, abs=1e-9)
    assert (g["sigma_y"], g["sigma_x"]) == (pytest.approx(4.0, rel=1e-4), pytest.approx(9.0, rel=1e-4))
    assert (g["center_y"], g["center_x"]) == (pytest.approx(28, abs=1e-4), pytest.approx(45, abs=1e-4))


def test_area_ratios_of_a_hand_built_erf():
    """A uniform 5x5 block in a 21x21 map: the centred 3x3 holds 9/25 = 36%, the 5x5 holds 100%."""
    m = np.zeros((21, 21))
    m[8:13, 8:13] = 1.0
    r = erf.area_ratios(m)
    assert r == {0.2: 9 / 441, 0.3: 9 / 441, 0.5: 25 / 441, 0.99: 25 / 441}
    # one central point: side 1 already holds everything
    point = np.zeros((11, 11))
    point[5, 5] = 2.0
    assert erf.area_ratios(point, thresholds=(0.5,)) == {0.5: 1 / 121}
    # mass on the border: the square has to grow (clipped) over the whole map
    ring = np.zeros((10, 10))
    ring[0, 0] = 1.0
    assert erf.area_ratios(ring, thresholds=(0.2,)) == {0.2: 1.0}


def test_area_ratios_use_strict_threshold_like_replknet():
    m = np.zeros((7, 7))
    m[3, 3] = 1.0
    m[0, 0] = 1.0  # centre holds exactly half
    assert erf.area_ratios(m, thresholds=(0.5,))[0.5] == 1.0  # exactly 50% is not "> 50%"
    assert erf.area_ratios(m, thresholds=(0.49,))[0.49] == 1 / 49


def test_log_scale_matches_replknet_rescaling():
    raw = np.array([[0.0, 9.0], [99.0, 0.0]])
    np.testing.assert_allclose(erf.log_scale(raw), [[0, 0.5], [1, 0]])


def test_big_kernel_has_larger_area_ratio_than_small_kernel():
    def net(k):
        torch.manual_seed(0)
        layers = [nn.Conv2d(1, 8, 3, padding=1)]
        for _ in range(3):
            layers += [nn.GELU(), nn.Conv2d(8, 8, k, padding=k // 2, groups=8), nn.Conv2d(8, 8, 1)]
        return nn.Sequential(*layers)

    x = torch.randn(8, 1, 65, 65)
    small, big = erf.analyse_erf(net(3), x), erf.analyse_erf(net(13), x)
    assert big.area_ratio[0.2] > 2 * small.area_ratio[0.2]
    assert big.gaussian["sigma_x"] > 2 * small.gaussian["sigma_x"]


def test_layer_selection_stops_at_the_chosen_submodule():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(4, 1, 15, 15)
    first = erf.erf_map(seq, x, layer="0", grad_mode="abs")
    full = erf.erf_map(seq, x, grad_mode="abs")
    assert np.count_nonzero(first) == 9
    assert np.count_nonzero(full) == 25


def test_backbone_stage_erf_grows_with_depth():
    from uniperc import UniPercNet

    torch.manual_seed(0)
    model = UniPercNet(in_chans=1, num_classes=0, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=(3, 7, 7, 7),
                       mixer_kwargs={"layer_scale_init_value": 1.0})
    x = torch.randn(2, 1, 64, 64)
    stem = erf.analyse_erf(model, x, layer="stem")
    last = erf.analyse_erf(model, x)  # forward_features
    assert stem.area_ratio[0.99] < last.area_ratio[0.99]
    assert stem.summary()["layer"] == "stem" and last.num_samples == 2


def test_bad_inputs_raise_value_error():
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="layer"):
        erf.erf_map(conv, torch.randn(1, 1, 8, 8), layer="nope")
    with pytest.raises(ValueError, match="inputs"):
        erf.erf_map(conv, torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="grad_mode"):
        erf.erf_map(conv, torch.randn(1, 1, 8, 8), grad_mode="square")
    with pytest.raises(ValueError, match="feature map"):
        erf.erf_map(nn.Sequential(conv, nn.Flatten()), torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="all zeros"):
        erf.area_ratios(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="thresholds"):
        erf.area_ratios(np.ones((5, 5)), thresholds=(1.5,))
    with pytest.raises(ValueError, match="exactly one"):
        erf.load_model(None, None)
    with pytest.raises(ValueError, match="not a registered timm model"):
        erf.load_model("no_such_model_xyz")


def test_cli_writes_heatmap_and_prints_metrics(tmp_path, monkeypatch, capsys):
    """The CLI plumbing (timm model by name, layer, PNG, .npy); demo data are replaced by random inputs."""
    monkeypatch.setattr(erf, "modality_inputs", lambda modality, n, **kw: torch.randn(n, 3, 64, 64))
    out, npy = tmp_path / "erf.png", tmp_path / "erf.npy"
    summary = erf.main(["--model", "unireplknet_a", "--modality", "image", "--layer", "stages.1",
                        "--num-samples", "2", "--out", str(out), "--save-npy", str(npy)])
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert np.load(npy).shape == (64, 64)
    assert 0 < summary["area@0.2"] <= summary["area@0.99"] <= 1
    assert '"gauss_r2"' in capsys.readouterr().out


def test_checkpoint_path_analyses_one_modality_of_an_exported_model(tmp_path, monkeypatch):
    from uniperc.export import export
    from uniperc.multimodal import MultiModalNet

    torch.manual_seed(0)
    tasks = {m: {"in_chans": c, "task": "classification", "num_outputs": 3, "label_smoothing": 0.0,
                 "output_names": None} for m, c in (("image", 3), ("audio", 1))}
    net = MultiModalNet("unireplknet_a", tasks, {"dims": [8, 8, 8, 8], "depths": [1, 1, 1, 1], "kernel_sizes": [3, 7, 7, 7]})
    export(net, tmp_path / "run" / "model")
    model = erf.load_model(checkpoint=str(tmp_path / "run"), modality="audio")  # a run dir: export in model/
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.forward_features(x), net.eval().forward_features(x, "audio"),
                               rtol=1e-4, atol=1e-4)
    assert model.get_submodule("stages.1") is model.stages[1]
    with pytest.raises(ValueError, match="no stem"):
        erf.load_model(checkpoint=str(tmp_path / "run" / "model"), modality="video")
    monkeypatch.setattr(erf, "modality_inputs", lambda modality, n, **kw: torch.randn(n, 1, 32, 32))
    summary = erf.main(["--checkpoint", str(tmp_path / "run"), "--modality", "audio", "--num-samples", "2",
                        "--out", str(tmp_path / "erf.png")])
    assert summary["input_hw"] == [32, 32] and (tmp_path / "erf.png").is_file()
