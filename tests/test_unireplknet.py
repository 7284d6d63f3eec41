"""UniRepLKNet variants: published parameter counts, timm API, official checkpoints."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import uniperc
from uniperc.reparam import dilated_to_dense
from conftest import load_reference_keys, random_state_dict, rel_l1

# Official counts with a 1000-class head: (after reparameterisation, train-time), in millions.
PUBLISHED_PARAMS = {
    "unireplknet_a": (4.44, 4.65), "unireplknet_f": (6.24, 6.49), "unireplknet_p": (10.74, 11.08),
    "unireplknet_n": (18.32, 18.82), "unireplknet_t": (31.04, 31.69), "unireplknet_s": (55.65, 56.46),
    "unireplknet_b": (98.01, 99.09), "unireplknet_l": (218.45, 220.08), "unireplknet_xl": (386.53, 388.69),
}


def count(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_official(name):
    deploy, train = PUBLISHED_PARAMS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert abs(count(model) - train) / train < 1e-3, count(model)
    uniperc.reparameterize(model)
    assert abs(count(model) - deploy) / deploy < 1e-3, count(model)


def test_published_kernel_layout():
    with torch.device("meta"):
        t = timm.create_model("unireplknet_t")
        s = timm.create_model("unireplknet_s")

    def kernels(model, stage):
        return [b.dwconv.kernel_size if hasattr(b.dwconv, "kernel_sizes") else b.dwconv.kernel_size[0]
                for b in model.stages[stage].blocks]

    assert kernels(t, 0) == [3, 3, 3] and kernels(t, 1) == [13] * 3 and kernels(t, 3) == [13] * 3
    assert kernels(t, 2) == [13, 3] * 9
    assert kernels(s, 2) == [13, 3, 3] * 9


def test_timm_api_surface():
    model = timm.create_model("unireplknet_a", num_classes=7, in_chans=1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 7)
    feats = model.forward_features(x)
    assert feats.shape == (2, 320, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 320)
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [t.shape[1] for t in inter] == [80, 320] and torch.equal(final, feats)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    dp = [b.drop_path.drop_prob for s in model.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert dp[-1] == pytest.approx(0.1) and dp == sorted(dp)


def test_features_only():
    model = timm.create_model("unireplknet_a", features_only=True, out_indices=(1, 2, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1:] for o in outs] == [(80, 8, 8), (160, 4, 4), (320, 2, 2)]
    assert model.feature_info.reduction() == [8, 16, 32]


def test_local_checkpoint_through_pretrained_overlay(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("unireplknet_a", num_classes=5).eval()
    path = tmp_path / "a.safetensors"
    save_file(src.state_dict(), str(path))
    dst = timm.create_model("unireplknet_a", num_classes=5, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


# ---- official checkpoints: a functional re-implementation of the official forward on official keys ----

def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def _ln_cf(x, sd, p):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + "weight"], sd[p + "bias"], 1e-6).permute(0, 3, 1, 2)


def _dw(x, w, b=None, dilation=1):
    k = w.shape[-1]
    return F.conv2d(x, w, b, padding=dilation * (k - 1) // 2, dilation=dilation, groups=x.shape[1])


def official_forward(sd, x, depths=(2, 2, 6, 2), deploy=False):
    """The official UniRepLKNet forward written directly against its state-dict names."""
    for i in range(4):
        p = f"downsample_layers.{i}."
        if i == 0:
            x = F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1)
            x = F.gelu(_ln_cf(x, sd, p + "1."))
            x = _ln_cf(F.conv2d(x, sd[p + "3.weight"], sd[p + "3.bias"], stride=2, padding=1), sd, p + "4.")
        else:
            x = _ln_cf(F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1), sd, p + "1.")
        for j in range(depths[i]):
            b = f"stages.{i}.{j}."
            if b + "dwconv.lk_origin.weight" in sd:
                y = _dw(x, sd[b + "dwconv.lk_origin.weight"], sd.get(b + "dwconv.lk_origin.bias"))
                if not deploy:
                    y = _bn(y, sd, b + "dwconv.origin_bn.")
                    for key in [k for k in sd if k.startswith(b + "dwconv.dil_conv_k")]:
                        k, r = map(int, key[len(b + "dwconv.dil_conv_k"):-len(".weight")].split("_"))
                        y = y + _bn(_dw(x, sd[key], dilation=r), sd, b + f"dwconv.dil_bn_k{k}_{r}.")
            else:
                y = _dw(x, sd[b + "dwconv.weight"], sd.get(b + "dwconv.bias"))
            if not deploy:
                y = _bn(y, sd, b + "norm.")
            s = F.adaptive_avg_pool2d(y, 1)
            s = F.relu(F.conv2d(s, sd[b + "se.down.weight"], sd[b + "se.down.bias"]))
            y = y * torch.sigmoid(F.conv2d(s, sd[b + "se.up.weight"], sd[b + "se.up.bias"]))
            y = F.gelu(F.linear(y.permute(0, 2, 3, 1), sd[b + "pwconv1.1.weight"], sd[b + "pwconv1.1.bias"]))
            gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            y = (sd[b + "act.1.gamma"] * nx + 1) * y + sd.get(b + "act.1.beta", 0)
            y = F.linear(y, sd[b + "pwconv2.0.weight"], sd.get(b + "pwconv2.0.bias")).permute(0, 3, 1, 2)
            if not deploy:
                y = _bn(y, sd, b + "pwconv2.2.") * sd[b + "gamma"].view(1, -1, 1, 1)
            x = x + y
    x = F.layer_norm(x.mean((-2, -1)), x.shape[1:2], sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_official_train_checkpoint_loads_and_matches():
    shapes = load_reference_keys("unireplknet_a.keys.txt")
    official = random_state_dict(shapes, seed=1)
    model = timm.create_model("unireplknet_a").eval()
    uniperc.load_converted(model, official, family="unireplknet")
    assert torch.equal(model.stages[1].blocks[0].dwconv.dil_conv_k7_2.weight,
                       official["stages.1.0.dwconv.dil_conv_k7_2.weight"])
    assert torch.equal(model.stages[2].blocks[3].grn.weight, official["stages.2.3.act.1.gamma"].flatten())
    assert_same_function(model, official)


def assert_same_function(model, official, deploy=False):
    """Same outputs as the official forward, in float64 so only the math is compared, not rounding."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    official = {k: v.double() if v.is_floating_point() else v for k, v in official.items()}
    with torch.no_grad():
        assert rel_l1(model.double()(x), official_forward(official, x, deploy=deploy)) < 1e-10


def test_official_deploy_checkpoint_loads_and_matches():
    shapes = load_reference_keys("unireplknet_a.deploy.keys.txt")
    official = random_state_dict(shapes, seed=2)
    model = timm.create_model("unireplknet_a").eval()
    uniperc.load_converted(model, official, family="unireplknet")  # reparameterises the model itself
    assert not hasattr(model.stages[1].blocks[0].dwconv, "origin_bn")
    assert_same_function(model, official, deploy=True)


def test_official_checkpoint_through_timm_pretrained(tmp_path):
    official = random_state_dict(load_reference_keys("unireplknet_a.keys.txt"), seed=3)
    path = tmp_path / "unireplknet_a_official.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert_same_function(model, official)


def test_checkpoint_with_wrong_keys_names_them():
    official = random_state_dict(load_reference_keys("unireplknet_a.keys.txt"))
    del official["stages.2.4.se.up.weight"]
    official["stages.9.0.bogus"] = torch.zeros(1)
    model = timm.create_model("unireplknet_a")
    with pytest.raises(ValueError, match=r"missing keys.*stages\.2\.blocks\.4\.se\.fc2\.weight"):
        uniperc.load_converted(model, official, family="unireplknet")
    with pytest.raises(ValueError, match="unknown checkpoint family"):
        uniperc.convert_checkpoint(official, family="resnet")


def test_dilated_to_dense_places_taps():
    k = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 3, 3)
    dense = dilated_to_dense(k, 3)
    assert dense.shape == (1, 1, 7, 7)
    assert torch.equal(dense[0, 0, ::3, ::3], k[0, 0]) and dense.count_nonzero() == 9
