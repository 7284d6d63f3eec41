"""The generic backbone, the Dilated Reparam block and structural re-parameterisation."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import uniperc
from uniperc.backbone import UniPercNet
from uniperc.blocks import list_blocks
from uniperc.blocks.dilated_reparam import PUBLISHED_BRANCHES, DilatedReparamBlock, UniRepLKNetBlock, dilated_branches
from uniperc.variants.unireplknet import MODEL_ARGS
from conftest import randomize_bn_and_scales, rel_l1

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))


def test_published_branch_tables():
    assert dilated_branches(13) == ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5))
    assert dilated_branches(17) == ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7))
    assert dilated_branches(7) == ((5, 3, 3), (1, 2, 3))
    assert dilated_branches(5) == ((3, 3), (1, 2))


@pytest.mark.parametrize("k", list(range(5, 102, 2)))
def test_every_branch_fits_and_is_distinct(k):
    sizes, rates = dilated_branches(k)
    equivalent = [r * (s - 1) + 1 for s, r in zip(sizes, rates)]
    assert max(equivalent) <= k
    assert len(set(zip(sizes, rates))) == len(sizes)  # unique branch names
    if k not in PUBLISHED_BRANCHES:
        assert equivalent[1] >= k - 2  # the rate-2 branch reaches (almost) the full kernel
        assert rates[2:] == tuple(sorted(set(rates[2:])))


def test_derived_tables_for_large_kernels():
    assert dilated_branches(31) == ((5, 15, 3, 3, 3), (1, 2, 8, 11, 14))
    assert dilated_branches(51) == ((5, 25, 3, 3, 3), (1, 2, 12, 18, 24))


@pytest.mark.parametrize("bad", [4, 14, 3, 1, -5, 7.0])
def test_dilated_reparam_rejects_bad_kernel(bad):
    with pytest.raises(ValueError, match="kernel_size"):
        DilatedReparamBlock(8, bad)


@pytest.mark.parametrize("k", [5, 7, 9, 11, 13, 15, 17, 19, 31, 51])
def test_dilated_reparam_block_folds_exactly(k):
    torch.manual_seed(k)
    block = randomize_bn_and_scales(DilatedReparamBlock(4, k), seed=k).eval()
    x = torch.randn(2, 4, k + 6, k + 3)
    before = block(x)
    block.reparameterize()
    assert list(dict(block.named_children())) == ["lk_origin"]
    assert rel_l1(block(x), before) <= 1e-5


@pytest.mark.parametrize("k", [3, 5, 13, 51])
def test_unireplknet_block_folds_exactly(k):
    torch.manual_seed(0)
    block = randomize_bn_and_scales(UniRepLKNetBlock(8, k), seed=1).eval()
    x = torch.randn(2, 8, 20, 20)
    before = block(x)
    uniperc.reparameterize(block)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())
    assert block.gamma is None and "grn.bias" not in block.state_dict()
    assert rel_l1(block(x), before) <= 1e-5


@pytest.mark.parametrize("name", sorted(MODEL_ARGS))
def test_every_variant_reparameterises_exactly(name):
    """Each variant's depths and per-block kernels; widths shrunk (the fold is per channel) so it runs fast."""
    args = dict(MODEL_ARGS[name], dims=(8, 16, 32, 64))
    model = randomize_bn_and_scales(UniPercNet(num_classes=10, **args), seed=2).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    reparameterize_model(model, inplace=True)  # timm's entry point reaches our blocks too
    assert rel_l1(model(x), before) <= 1e-5


def test_real_variant_reparameterises_exactly():
    model = randomize_bn_and_scales(timm.create_model("unireplknet_a", num_classes=10), seed=3).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    assert uniperc.reparameterize(model) is model
    assert rel_l1(model(x), before) <= 1e-5


def test_any_in_chans_and_per_block_kernels():
    model = UniPercNet(in_chans=5, num_classes=4, depths=(1, 1, 3, 1), dims=(8, 16, 32, 64),
                       kernel_sizes=(3, 7, [31, 3, 0], 5)).eval()
    ks = [b.dwconv.kernel_size for b in model.stages[2].blocks[:1]] + [model.stages[2].blocks[1].dwconv.kernel_size[0]]
    assert ks == [31, 3] and isinstance(model.stages[2].blocks[2].dwconv, torch.nn.Identity)
    assert model(torch.randn(2, 5, 48, 40)).shape == (2, 4)


def test_drop_path_is_stochastic_only_in_training():
    model = randomize_bn_and_scales(UniPercNet(num_classes=3, drop_path_rate=0.5, **TINY))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_mixer_registry_lists_dilated_reparam():
    assert "dilated_reparam" in list_blocks()


@pytest.mark.parametrize("kwargs, message", [
    (dict(mixer="no_such_mixer"), "unknown mixer 'no_such_mixer'"),
    (dict(mixer=["dilated_reparam"] * 3), "mixer needs one entry per stage"),
    (dict(kernel_sizes=(3, 13, 14, 13)), "kernel_size"),
    (dict(kernel_sizes=(3, 13, [13], 13)), r"kernel_sizes\[2\] needs one entry per block"),
    (dict(stem="nope"), "unknown stem 'nope'"),
    (dict(downsample="nope"), "unknown downsample 'nope'"),
    (dict(in_chans=0), "in_chans"),
    (dict(depths=(1, 1, 1)), "same length"),
    (dict(head_norm="bn"), "head_norm"),
])
def test_bad_configuration_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniPercNet(**dict(TINY, **kwargs))


def test_bad_input_is_a_value_error():
    model = UniPercNet(in_chans=1, num_classes=3, **TINY)
    with pytest.raises(ValueError, match="3 channels but the model was built with in_chans=1"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(1, 32, 32))


def test_reparameterize_is_idempotent():
    model = randomize_bn_and_scales(UniPercNet(num_classes=3, **TINY)).eval()
    uniperc.reparameterize(model)
    state = copy.deepcopy(model.state_dict())
    uniperc.reparameterize(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("hw", [1, 2, 5])
def test_strided_conv_gradients_are_exact_in_bf16_on_tiny_inputs(hw):
    """A 1x1 input reaching a 3x3 stride-2 conv (a deep stage of a small image): every tap that sees only padding
    must get a zero weight gradient under CPU bf16 autocast (PyTorch's own path reads uninitialised memory)."""
    from uniperc.layers import StridedConv2d

    torch.manual_seed(0)
    conv = StridedConv2d(16, 24, 3, stride=2, padding=1)
    ref = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(4, 16, hw, hw)
    for _ in range(3):  # fresh allocations each time: garbage would show up in at least one
        torch.full((1 << 18,), float("nan"), dtype=torch.bfloat16)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
        ref.zero_grad()
        ref(x.double()).square().sum().backward()
        assert torch.isfinite(conv.weight.grad).all()
        torch.testing.assert_close(conv.weight.grad.double(), ref.weight.grad, rtol=0.05, atol=0.05 * ref.weight.grad.abs().max().item())
        if hw == 1:
            assert conv.weight.grad[:, :, 0].abs().max() == 0 and conv.weight.grad[:, :, :, 0].abs().max() == 0
