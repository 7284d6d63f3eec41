"""VAN's Large Kernel Attention block and VAN variants: counts, official checkpoints, reparameterisation."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import uniperc
from uniperc.backbone import UniPercNet
from uniperc.blocks.lka import LKABlock
from uniperc.variants.van import convert_official_van
from conftest import load_reference_keys, random_state_dict, randomize_bn_and_scales, rel_l1

# Official VAN parameter counts (M, 1000 classes)
OFFICIAL_PARAMS = {"van_b0": 4.106, "van_b1": 13.862, "van_b2": 26.578, "van_b3": 44.766}


# --- an independent re-implementation of the official VAN module layout (keys and forward) ------------
class _OfficialLKA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class _OfficialAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj_1, self.activation = nn.Conv2d(dim, dim, 1), nn.GELU()
        self.spatial_gating_unit, self.proj_2 = _OfficialLKA(dim), nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class _OfficialMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv = nn.Conv2d(dim, hidden, 1), nn.Module()
        self.dwconv.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act, self.fc2 = nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.dwconv.dwconv(self.fc1(x))))


class _OfficialBlock(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.BatchNorm2d(dim), _OfficialAttention(dim)
        self.norm2, self.mlp = nn.BatchNorm2d(dim), _OfficialMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.layer_scale_2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.attn(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class _OfficialPatchEmbed(nn.Module):
    def __init__(self, in_ch, dim, patch, stride):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(in_ch, dim, patch, stride, patch // 2), nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class _OfficialVAN(nn.Module):
    def __init__(self, dims, depths, mlp_ratios=(8, 8, 4, 4), num_classes=10):
        super().__init__()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            setattr(self, f"patch_embed{i + 1}", _OfficialPatchEmbed(3 if i == 0 else dims[i - 1], dim,
                                                                     7 if i == 0 else 3, 4 if i == 0 else 2))
            setattr(self, f"block{i + 1}", nn.ModuleList(_OfficialBlock(dim, mlp_ratios[i]) for _ in range(depth)))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for i in range(4):
            x = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x)
            b, c, h, w = x.shape
            x = getattr(self, f"norm{i + 1}")(x.flatten(2).transpose(1, 2))  # tokens, as the official code
            x = x.transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 1e-3, params


def test_timm_names_are_ours():
    assert timm.list_models("van*") == ["van_b0", "van_b1", "van_b2", "van_b3"]
    with torch.device("meta"):
        model = timm.create_model("van_b0")
    assert isinstance(model, UniPercNet)
    assert [len(s.blocks) for s in model.stages] == [3, 3, 5, 2]
    assert [s.blocks[0].mlp.fc1.out_channels // s.blocks[0].mlp.fc1.in_channels for s in model.stages] == [8, 8, 4, 4]


def test_lka_block_ignores_kernel_size_and_rejects_bad_mlp_ratio():
    torch.manual_seed(0)
    a, b = LKABlock(8, 3), LKABlock(8, 51)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 12, 12)
    torch.testing.assert_close(a(x), b(x))
    assert a.attn.spatial_gating_unit.conv_spatial.dilation == (3, 3)
    with pytest.raises(ValueError, match="mlp_ratio"):
        LKABlock(8, 0, mlp_ratio=0)


def test_lka_is_u_times_attention_map():
    torch.manual_seed(1)
    lka = LKABlock(4, 0).attn.spatial_gating_unit
    u = torch.randn(1, 4, 30, 30)
    attn = lka.conv1(lka.conv_spatial(lka.conv0(u)))
    torch.testing.assert_close(lka(u), u * attn)
    # receptive field: 5x5 then 7x7 at dilation 3 -> 23x23 (covers the 21x21 the paper decomposes)
    probe = torch.zeros(1, 4, 30, 30, requires_grad=True)
    lka.conv_spatial(lka.conv0(probe))[0, :, 15, 15].sum().backward()
    rows = probe.grad[0].abs().sum((0, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 23


def test_official_key_list_converts_and_lands():
    shapes = load_reference_keys("van_b0.keys.txt")
    official = random_state_dict(shapes)
    model = timm.create_model("van_b0")
    converted = convert_official_van(official)
    uniperc.load_converted(model, official, "van")
    own = model.state_dict()
    assert set(converted) == set(own)
    for key, value in official.items():
        assert torch.equal(own[convert_official_van({key: value}).popitem()[0]], value), key
    assert torch.equal(own["stages.2.blocks.4.mlp.dwconv.weight"], official["block3.4.mlp.dwconv.dwconv.weight"])
    assert torch.equal(own["stages.3.norm.weight"], official["norm4.weight"])
    assert torch.equal(own["stem.1.running_var"], official["patch_embed1.norm.running_var"])
    assert torch.equal(own["head.fc.weight"], official["head.weight"])


def _tiny_van(num_classes=10):
    return timm.create_model("van_b0", dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_classes=num_classes)


def test_outputs_match_official_structure():
    torch.manual_seed(2)
    official = randomize_bn_and_scales(_OfficialVAN((8, 16, 24, 32), (1, 1, 2, 1))).eval()
    ours = uniperc.load_converted(_tiny_van(), official.state_dict(), "van").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)


def test_reparameterize_block_and_model():
    torch.manual_seed(3)
    block = randomize_bn_and_scales(LKABlock(8, 0, mlp_ratio=4)).eval()
    x = torch.randn(2, 8, 10, 10)
    before = block(x)
    block.reparameterize()
    block.reparameterize()  # idempotent
    assert not any(k.startswith(("norm", "layer_scale")) for k in block.state_dict())
    assert rel_l1(block(x), before) <= 1e-5

    model = randomize_bn_and_scales(_tiny_van()).eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    deployed = uniperc.reparameterize(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # stem/downsample BNs folded too
    assert rel_l1(deployed(x), before) <= 1e-5
    # a deploy-form checkpoint loads into a train-form model (which is folded to fit)
    fresh = uniperc.load_converted(_tiny_van(), deployed.state_dict(), "van").eval()
    assert rel_l1(fresh(x), before) <= 1e-5


def test_lka_in_any_stage_of_the_generic_backbone():
    net = UniPercNet(num_classes=3, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32),
                     mixer=["lka", "dilated_reparam", ["lka"], "peripheral"], kernel_sizes=(0, 7, 0, 5))
    out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3)
    out.sum().backward()
    assert net.stages[2].blocks[0].attn.spatial_gating_unit.conv0.weight.grad.abs().sum() > 0
