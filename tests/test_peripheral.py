"""PeLK's peripheral convolution: sharing grid, positional embedding, reparameterisation, variants."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import uniperc
from uniperc.backbone import UniPercNet
from uniperc.blocks.peripheral import (PeripheralBlock, PeripheralConv, peripheral_axis_widths,
                                       peripheral_half_widths, peripheral_index, position_term)
from conftest import randomize_bn_and_scales, rel_l1

# Paper: parameters (M) with a 1000-class head
PAPER_PARAMS = {"pelk_t": 29, "pelk_s": 50, "pelk_b": 89, "pelk_b_101": 90}


def test_k51_grid_is_the_papers():
    assert peripheral_half_widths(51) == [1, 1, 1, 2, 4, 8, 9]
    assert peripheral_axis_widths(51) == [9, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 9]
    conv = PeripheralConv(4, 51)
    assert tuple(conv.weight.shape) == (4, 13, 13)
    assert conv.weight.numel() / (4 * 51 * 51) <= 0.10  # 169 / 2601 = 6.5 %
    assert tuple(conv.kernel().shape) == (4, 1, 51, 51)


def test_k101_grid_with_7x7_centre():
    assert peripheral_half_widths(101, 7) == [1, 1, 1, 1, 2, 4, 8, 16, 17]
    assert len(peripheral_axis_widths(101, 7)) == 17


@pytest.mark.parametrize("central", [1, 3, 5, 7, 9])
def test_grid_rule_for_every_odd_kernel(central):
    for k in range(max(3, central), 102, 2):
        half = peripheral_half_widths(k, central)
        ones = (central + 1) // 2
        assert sum(half) == (k + 1) // 2
        assert half[:ones] == [1] * ones  # unshared centre
        growth = half[ones:-1] if len(half) > ones else []
        assert growth == [2 ** (i + 1) for i in range(len(growth))], (k, half)  # x2 per step
        assert all(a <= b for a, b in zip(half, half[1:])), (k, half)  # never finer outward
        if len(half) > ones + 1:
            assert half[-1] < 2 * half[-2] * 2  # the remainder is smaller than two more doubling steps
        axis = peripheral_axis_widths(k, central)
        assert sum(axis) == k and axis == axis[::-1]
        index = peripheral_index(k, central)
        assert index.tolist() == sorted(index.tolist()) and int(index[k // 2]) == len(axis) // 2


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="kernel_size"):
        PeripheralConv(8, 50)
    with pytest.raises(ValueError, match="central_region"):
        PeripheralConv(8, 5, central_region=7)
    with pytest.raises(ValueError, match="central_region"):
        PeripheralConv(8, 13, central_region=4)
    with pytest.raises(ValueError, match="small_kernel"):
        PeripheralConv(8, 13, central_region=3, small_kernel=5)
    with pytest.raises(ValueError, match="dim"):
        PeripheralBlock(20, 13)
    with pytest.raises(ValueError, match="kernel_size"):
        PeripheralBlock(16, 12)


def test_small_kernels_accepted():
    for k in (3, 5, 7):
        block = PeripheralBlock(8, k).eval()
        assert block(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)
    assert not hasattr(PeripheralBlock(8, 5).conv, "small_conv")  # a 5x5 beside a 5x5 would be redundant


def test_expanded_kernel_shares_parameters_and_gradients():
    torch.manual_seed(0)
    conv = PeripheralConv(3, 15)
    idx = peripheral_index(15)
    kernel = conv.kernel()
    assert torch.equal(kernel[:, 0], conv.weight[:, idx][:, :, idx])
    # gradient of each shared parameter = sum of the dense-kernel gradients over its block
    dense = kernel.detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, 9, 9)
    pos = torch.randn(3, 15, 15) * 0.1
    target = torch.randn(2, 3, 9, 9)
    (PeripheralConv._embedded_conv(x, kernel, pos) * target).sum().backward()
    (PeripheralConv._embedded_conv(x, dense, pos) * target).sum().backward()
    n = conv.weight.shape[-1]
    onehot = torch.nn.functional.one_hot(idx, n).float()  # K x n
    expected = torch.einsum("ia,cij,jb->cab", onehot, dense.grad[:, 0], onehot)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert conv.weight.grad[:, 0, 0].abs().min() > 0  # the outermost shared corner gets gradient


def _reference_embedded_conv(x, kernel, pos):
    """Y(p) = sum over in-image taps t of w(t) * (X(p + t) + h(t)), written as a slow loop."""
    b, c, h, w = x.shape
    k = kernel.shape[-1]
    r = k // 2
    y = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for a in range(k):
                for bb in range(k):
                    ii, jj = i + a - r, j + bb - r
                    if 0 <= ii < h and 0 <= jj < w:
                        y[:, :, i, j] += kernel[:, 0, a, bb] * (x[:, :, ii, jj] + pos[:, a, bb])
    return y


def test_positional_embedding_matches_the_definition():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 8)
    kernel = PeripheralConv(3, 7, central_region=3).kernel().detach()
    pos = torch.randn(3, 7, 7)
    got = PeripheralConv._embedded_conv(x, kernel, pos)
    ref = _reference_embedded_conv(x, kernel, pos)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # away from borders the positional term is the constant sum w*h; at a border only in-image taps count
    term = position_term(kernel[:, 0] * pos, 9, 9)[0]
    torch.testing.assert_close(term[:, 4, 4], (kernel[:, 0] * pos).sum((-1, -2)))
    torch.testing.assert_close(term[:, 0, 0], (kernel[:, 0, 3:, 3:] * pos[:, 3:, 3:]).sum((-1, -2)))


@pytest.mark.parametrize("kernel_size", [13, 51])
def test_reparameterize_folds_bn_and_small_kernel(kernel_size):
    torch.manual_seed(2)
    block = randomize_bn_and_scales(PeripheralBlock(16, kernel_size)).eval()
    x = torch.randn(2, 16, 9, 11)
    before = block(x)
    block.reparameterize()
    block.reparameterize()  # idempotent
    keys = set(block.state_dict())
    assert not any("bn" in k or "small_conv" in k or "gamma" in k for k in keys)
    assert tuple(block.conv.weight.shape[1:]) == (len(peripheral_axis_widths(kernel_size)),) * 2  # still shared
    assert rel_l1(block(x), before) <= 1e-5


def _tiny_net(**kwargs):
    args = dict(in_chans=3, num_classes=5, depths=(2, 1, 1, 1), dims=(16, 16, 32, 32), mixer="peripheral",
                kernel_sizes=((7, 5), 5, 3, 3), stem="pelk", downsample="pelk")
    return UniPercNet(**dict(args, **kwargs))


def test_positional_embedding_is_shared_per_stage():
    net = _tiny_net()
    keys = [k for k in net.state_dict() if "pos_embed" in k]
    assert keys == [f"stages.{i}.shared.peripheral.pos_embed" for i in range(4)]
    assert tuple(net.stages[0].shared["peripheral"].pos_embed.shape) == (6, 7, 7)  # 3/8 of 16, largest K
    net(torch.randn(1, 3, 64, 64)).sum().backward()
    assert net.stages[0].shared["peripheral"].pos_embed.grad.abs().sum() > 0
    # the 5x5 block reads the central crop of the 7x7 embedding
    block = net.stages[0].blocks[1]
    torch.testing.assert_close(block._pos_embed[0](5), net.stages[0].shared["peripheral"].pos_embed[:, 1:6, 1:6])


def test_mixed_mixers_and_whole_model_reparameterisation():
    torch.manual_seed(3)
    net = randomize_bn_and_scales(_tiny_net(mixer=["peripheral", "lka", "dilated_reparam", "peripheral"],
                                            kernel_sizes=(9, 0, 7, 3))).eval()
    x = torch.randn(2, 3, 64, 64)
    before = net(x)
    assert before.shape == (2, 5)
    uniperc.reparameterize(net)
    assert rel_l1(net(x), before) <= 1e-5


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_within_3_percent(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, params
    kernels = [stage.blocks[0].kernel_size for stage in model.stages]
    assert kernels == ([101, 69, 67, 13] if name.endswith("101") else [51, 49, 47, 13])
    assert model.stages[0].blocks[0].conv.central_region == (7 if name.endswith("101") else 5)


def test_pelk_frame_runs_through_timm():
    model = timm.create_model("pelk_t", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), num_classes=4).eval()
    assert [type(m).__name__ for m in model.stem] == ["Conv2d", "LayerNorm2d"]
    assert model.stem[0].kernel_size == (4, 4) and model.stem[0].stride == (4, 4)
    ds = model.stages[1].downsample
    assert [type(m).__name__ for m in ds] == ["LayerNorm2d", "Conv2d"] and ds[1].stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 4)
    feats = timm.create_model("pelk_t", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), features_only=True)(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (16, 8, 8), (32, 4, 4), (32, 2, 2)]


def test_deploy_checkpoint_loads_and_foreign_one_is_named():
    torch.manual_seed(4)
    kwargs = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), num_classes=4)
    model = randomize_bn_and_scales(timm.create_model("pelk_t", **kwargs)).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    deployed = uniperc.reparameterize(copy.deepcopy(model))
    fresh = uniperc.load_converted(timm.create_model("pelk_t", **kwargs), deployed.state_dict(), "pelk").eval()
    assert rel_l1(fresh(x), before) <= 1e-5
    with pytest.raises(ValueError, match="missing keys"):
        uniperc.load_converted(timm.create_model("pelk_t", **kwargs), {"conv.weight": torch.zeros(1)}, "pelk")
