"""Contract tests for block = shell + mixer, parametrised over the registries: a block or mixer registered
later is covered here without editing this file. Every block x mixer and every family x mixer pair builds,
trains (forward / backward) and re-parameterises exactly."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

import uniperc
from uniperc.backbone import UniPercNet
from uniperc.blocks import create_mixer, get_block, list_blocks, list_mixers, register_mixer
from uniperc.blocks import registry
from conftest import randomize_bn_and_scales, rel_l1

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=3)
# one variant per published family, with what it needs to run at tiny depths
FAMILIES = {"unireplknet_a": dict(kernel_sizes=(3, 7, 7, 7)), "uniconvnet_a": {}, "pelk_t": {}, "van_b0": {}}


def _mixer_type(name: str, dim: int = 8, kernel_size: int = 7) -> type:
    return type(create_mixer(name, dim, kernel_size))


def _holds(block: nn.Module, mixer: str) -> bool:
    """``block``'s mixer is what ``mixer`` builds at its width and kernel size."""
    return type(block.mixer) is _mixer_type(mixer, block.dim, block.kernel_size)


def _check_trains_and_folds_exactly(model: nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model = randomize_bn_and_scales(model, seed=seed).eval()
    with torch.no_grad():
        before = model(x)
        uniperc.reparameterize(model)
        after = model(x)
        assert rel_l1(after, before) <= 1e-5
        state = copy.deepcopy(model.state_dict())
        uniperc.reparameterize(model)  # idempotent
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mixer", list_mixers())
@pytest.mark.parametrize("block", list_blocks())
def test_every_mixer_in_every_block(block, mixer):
    model = UniPercNet(block=block, mixer=mixer, kernel_sizes=7, **TINY)
    for b in (b for s in model.stages for b in s.blocks):
        assert type(b) is get_block(block) and type(b.mixer) is _mixer_type(mixer)
        assert b.mixer is getattr(b, get_block(block).mixer_attr)
    _check_trains_and_folds_exactly(model)


@pytest.mark.parametrize("mixer", list_mixers())
@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_every_mixer_in_every_family_frame(variant, mixer):
    """``mixer=`` on a published variant swaps only the spatial mixer: the frame and the shell stay."""
    own = timm.create_model(variant, **TINY, **FAMILIES[variant])
    model = timm.create_model(variant, mixer=mixer, **TINY, **FAMILIES[variant])
    shell = type(own.stages[0].blocks[0])
    for b in (b for s in model.stages for b in s.blocks):
        assert type(b) is shell and _holds(b, mixer)

    def frame(m):
        return {k: v.shape for k, v in m.state_dict().items() if ".blocks." not in k and ".shared." not in k}

    assert frame(model) == frame(own)
    _check_trains_and_folds_exactly(model, seed=1)


@pytest.mark.parametrize("block", list_blocks())
def test_a_block_alone_is_its_published_self(block):
    """``block=`` alone (or ``mixer=`` alone on the bare backbone) is the published block with its own mixer."""
    cls = get_block(block)
    assert cls.own_mixer in list_mixers()
    for model in (UniPercNet(block=block, mixer=None, kernel_sizes=7, **TINY),
                  UniPercNet(mixer=block, kernel_sizes=7, **TINY)):
        b = model.stages[1].blocks[0]
        assert type(b) is cls and type(b.mixer) is _mixer_type(cls.own_mixer)


def test_mixers_per_stage_and_per_block_in_one_family():
    model = timm.create_model("uniconvnet_a", dims=(8, 16, 32, 64), depths=(2, 1, 2, 1), num_classes=3,
                              mixer=[["rfa", "lka"], "peripheral", ["dilated_reparam", "rfa"], None])
    got = [[type(b.mixer) for b in s.blocks] for s in model.stages]
    assert got == [[_mixer_type("rfa"), _mixer_type("lka")], [_mixer_type("peripheral")],
                   [_mixer_type("dilated_reparam"), _mixer_type("rfa")], [_mixer_type("rfa")]]
    assert {type(b) for s in model.stages for b in s.blocks} == {get_block("rfa")}
    _check_trains_and_folds_exactly(model, seed=2)


def test_whole_block_swap_in_a_family_frame():
    """``block=`` on a variant replaces the whole block (its own mixer) inside the family's frame."""
    model = timm.create_model("uniconvnet_a", block="lka", **TINY)
    b = model.stages[0].blocks[0]
    assert type(b) is get_block("lka") and type(b.mixer) is _mixer_type("lka")
    assert [type(m).__name__ for m in model.stem][:2] == ["StridedConv2d", "LayerNorm2d"]


def test_keyed_kwargs_reach_only_their_own_shell_and_mixer():
    model = timm.create_model("uniconvnet_n0", dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_classes=3,
                              mixer="peripheral", kernel_sizes=9,
                              mixer_kwargs={"rfa": {"dcn_group_channels": 16}, "peripheral": {"central_region": 3},
                                            "lka": {"mlp_ratio": 2}})  # lka is used by no block: left unused
    for s in model.stages:
        b = s.blocks[0]
        assert b.dcn.group == b.dim // 16 and b.mixer.central_region == 3
        assert b.mlp.fc1.out_features == 4 * b.dim
    # VAN's per-stage MLP ratios are its shell's: they survive a mixer swap
    van = timm.create_model("van_b0", mixer="rfa", **TINY)
    assert [s.blocks[0].mlp.fc1.out_channels // s.blocks[0].dim for s in van.stages] == [8, 8, 4, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(block="nope"), r"unknown block 'nope'; registered blocks: \['dilated_reparam'"),
    (dict(block="rfa", mixer="nope"), r"unknown mixer 'nope'; registered mixers: \['dilated_reparam'"),
    (dict(block=["rfa", "lka", "rfa"]), "block needs one entry per stage"),
    (dict(block=None, mixer=None), "needs a block or a mixer"),
    (dict(block="rfa", mixer="lka", mixer_kwargs={"lka": {"dcn_group_channels": 8}}),
     r"mixer_kwargs\[0\]\['lka'\]: unknown keyword 'dcn_group_channels'; 'lka' takes \['ls_init_value', 'mlp_ratio'\]"),
    (dict(block="rfa", mixer="lka", mixer_kwargs={"central_region": 7}),
     r"keyword 'central_region' is taken neither by block 'rfa' .* nor by mixer 'lka'"),
    (dict(mixer_kwargs={"rfa": {}, "mlp_ratio": 4}), r"mixes block/mixer names \['rfa'\] with plain keywords"),
    (dict(mixer_kwargs={"rfa": 3}), r"mixer_kwargs\[0\]\['rfa'\] must be a dict"),
    (dict(mixer_kwargs=["a", {}, {}, {}]), r"mixer_kwargs\[0\] must be a dict"),
])
def test_bad_names_and_keywords_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniPercNet(**dict(TINY, kernel_sizes=7, **kwargs))


def test_bad_names_through_timm_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'; registered mixers"):
        timm.create_model("van_b0", mixer="nope", **TINY)
    with pytest.raises(ValueError, match=r"mixer 'peripheral' takes no keyword 'bogus'; its keywords: "
                                         r"\['central_region', 'small_kernel'\]"):
        create_mixer("peripheral", 8, 7, bogus=1)


@pytest.fixture
def pool_mixer(monkeypatch):
    """A mixer registered at test time (PoolFormer's ``avgpool(x) - x``), removed afterwards."""
    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))

    class Pool(nn.Module):
        def __init__(self, dim: int, kernel_size: int, pool_size: int = 3):
            super().__init__()
            self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

        def forward(self, x):
            return self.pool(x) - x

    register_mixer("pool")(Pool)
    return Pool


@pytest.mark.parametrize("block", list_blocks())
def test_a_newly_registered_mixer_works_in_every_block(pool_mixer, block):
    model = UniPercNet(block=block, mixer="pool", kernel_sizes=7, mixer_kwargs={"pool": {"pool_size": 5}}, **TINY)
    mixer = model.stages[2].blocks[0].mixer
    assert isinstance(mixer, pool_mixer) and mixer.pool.kernel_size == 5
    _check_trains_and_folds_exactly(model, seed=3)
    with pytest.raises(ValueError, match="mixer 'pool' has no published block of its own"):
        UniPercNet(mixer="pool", **TINY)


def test_mixer_benchmark_keeps_one_shell():
    from uniperc.bench.mixers import SHELL, build

    for mixer in list_mixers():
        model = build(mixer, (1, 1, 1, 1), (16, 32, 64, 128))
        assert {type(b) for s in model.stages for b in s.blocks} == {get_block(SHELL)}
        assert all(_holds(b, mixer) for s in model.stages for b in s.blocks)
