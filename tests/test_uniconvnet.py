"""UniConvNet: the RFA / UniConvBlock ("rfa"), its variants, checkpoint conversion, reparameterisation."""
from pathlib import Path

import pytest
import timm
import torch

import uniperc
from uniperc import UniPercNet, convert_checkpoint, load_converted
from uniperc.blocks import get_block
from uniperc.blocks.rfa import ReceptiveFieldAggregator, UniConvBlock
from uniperc.ops import DCNv3

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "uniconvnet_a.keys.txt"

# Official parameter counts (millions, 1000 classes), from the UniConvNet paper / official code.
OFFICIAL_PARAMS_M = {"a": 3.407, "p0": 5.179, "p1": 6.094, "p2": 7.590, "n0": 10.254, "n1": 13.092,
                     "n2": 15.037, "n3": 19.695, "t": 30.326, "s": 50.026, "b": 97.659}


def _rel_l1(a, b):
    return ((a - b).abs().sum() / b.abs().sum()).item()


def test_param_counts_and_dcn_groups_match_official():
    for name, official in OFFICIAL_PARAMS_M.items():
        with torch.device("meta"):
            model = timm.create_model(f"uniconvnet_{name}")
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / 1e6 - official) / official < 1e-3, (name, count, official)
        # DCNv3 group = dim // 8 for A..P2 (models_A-P2), dim // 16 for N0..B (models_N0-XL)
        per_group = 8 if name in ("a", "p0", "p1", "p2") else 16
        assert [s.blocks[0].dcn.group for s in model.stages] == [s.blocks[0].dcn.channels // per_group
                                                                 for s in model.stages]


def test_block_is_registered_and_keeps_shape():
    assert get_block("rfa") is UniConvBlock
    block = UniConvBlock(24, 13)
    x = torch.randn(2, 24, 7, 9)
    assert block(x).shape == x.shape


def test_block_ignores_kernel_size():
    torch.manual_seed(0)
    a = UniConvBlock(16, 3)
    b = UniConvBlock(16, 31)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b.load_state_dict(a.state_dict())  # strict: same structure whatever the kernel size
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("kwargs,name", [(dict(dim=30), "dim"), (dict(dim=24, dcn_group_channels=7), "dcn_group_channels"),
                                         (dict(dim=24, mlp_ratio=0), "mlp_ratio")])
def test_block_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UniConvBlock(kernel_size=3, **kwargs)


def test_block_layer_scale_default_is_trained_value():
    block = UniConvBlock(8, 3)
    for p in (block.layer_scale, block.gamma1, block.gamma2):
        assert torch.all(p == 1e-6)


def test_rfa_receptive_field_is_25x25():
    """Three stacked layers with DW7, DW9, DW11 (plus 1x1 and per-pixel LN): the output at a pixel
    depends on exactly the inputs within Chebyshev radius 3 + 4 + 5 = 12."""
    torch.manual_seed(1)
    rfa = ReceptiveFieldAggregator(8)
    for p in rfa.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 8, 31, 31, requires_grad=True)
    rfa(x)[0, :, 15, 15].sum().backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (3, 27, 3, 27)


def test_reparameterize_folds_layer_scales_exactly():
    torch.manual_seed(2)
    block = UniConvBlock(16, 3)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    block.eval()
    x = torch.randn(2, 16, 8, 8)
    before = block(x)
    block.reparameterize()
    assert block.layer_scale is None and block.gamma1 is None and block.gamma2 is None
    assert not any(k in block.state_dict() for k in ("layer_scale", "gamma1", "gamma2"))
    after = block(x)
    assert _rel_l1(after, before) < 1e-5
    block.reparameterize()  # idempotent
    torch.testing.assert_close(block(x), after)


def test_model_forward_features_and_reparameterize():
    torch.manual_seed(3)
    model = timm.create_model("uniconvnet_a").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "gamma1", "gamma2")):
                p.uniform_(0.5, 1.5)
    assert all(torch.all(m.offset.weight == 0) and torch.all(m.mask.weight == 0)
               for m in model.modules() if isinstance(m, DCNv3))  # official DCNv3 init survives
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert before.shape == (1, 1000)
        feats = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]
        uniperc.reparameterize(model)
        assert _rel_l1(model(x), before) < 1e-5


def test_rfa_mixes_with_other_mixers_in_one_backbone():
    model = UniPercNet(num_classes=5, depths=(1, 2, 1, 1), dims=(16, 32, 64, 128),
                       mixer=["rfa", ["rfa", "dilated_reparam"], "dilated_reparam", "rfa"],
                       kernel_sizes=(3, [3, 7], 7, 3),
                       mixer_kwargs=[{}, {}, {}, {"dcn_group_channels": 16}])
    assert isinstance(model.stages[1].blocks[0], UniConvBlock)
    assert model.stages[0].blocks[0].dcn.group == 16 // 8       # default: 8 channels per group
    assert model.stages[3].blocks[0].dcn.group == 128 // 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def _official_state_dict():
    """Random tensors with the names and shapes of the official UniConvNet-A checkpoint."""
    gen = torch.Generator().manual_seed(4)
    state = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        state[key] = torch.randn(dims, generator=gen)
    return state


def test_official_checkpoint_converts_and_loads_strictly():
    official = _official_state_dict()
    assert sum(v.numel() for v in official.values()) == 3406732
    converted = convert_checkpoint({"model": official}, family="uniconvnet")
    assert len(converted) == len(official)  # a bijection: no two official keys collapse
    model = timm.create_model("uniconvnet_a")
    load_converted(model, {"model": official}, family="uniconvnet")
    own = model.state_dict()
    expected_places = {
        "downsample_layers.0.3.weight": "stem.3.weight",
        "downsample_layers.2.1.weight": "stages.2.downsample.1.weight",
        "stages.1.2.attn.a2.2.weight": "stages.1.blocks.2.attn.a2.2.weight",
        "stages.2.8.norm1.0.weight": "stages.2.blocks.8.norm1.weight",
        "stages.3.1.dcn.dw_conv.0.weight": "stages.3.blocks.1.dcn.dw_conv.weight",
        "stages.0.0.dcn.mask.weight": "stages.0.blocks.0.dcn.mask.weight",
        "stages.0.1.layer_scale": "stages.0.blocks.1.layer_scale",
        "norm.weight": "head.norm.weight",
        "head.weight": "head.fc.weight",
    }
    for src, dst in expected_places.items():
        assert torch.equal(own[dst], official[src]), (src, dst)
    for src, dst in zip(official, converted):
        assert torch.equal(own[dst], official[src]), (src, dst)


def test_converted_checkpoint_reparameterizes_and_reloads_in_deploy_form():
    """Official weights (random, so the layer scales are far from 1e-6): folding keeps the outputs,
    and the deploy-form state dict loads back through ``load_converted`` into a train-form model.
    Weights are N(0, 0.1^2): with N(0, 1) ones the features reach ~1e3 and float32 rounding alone,
    amplified through 16 blocks, moves the logits by ~1e-3."""
    official = {k: 0.1 * v for k, v in _official_state_dict().items()}
    model = load_converted(timm.create_model("uniconvnet_a").eval(), official, family="uniconvnet")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        deployed_state = uniperc.reparameterize(model).state_dict()
        after = model(x)
        assert torch.isfinite(before).all() and _rel_l1(after, before) < 1e-5
        fresh = load_converted(timm.create_model("uniconvnet_a").eval(), deployed_state, family="uniconvnet")
        assert not any(k.endswith(("gamma1", "gamma2", "layer_scale")) for k in fresh.state_dict())
        torch.testing.assert_close(fresh(x), after)


def test_converter_rejects_wrong_checkpoint():
    official = _official_state_dict()
    official.pop("stages.2.4.attn.v31.weight")
    with pytest.raises(ValueError, match="v31"):
        load_converted(timm.create_model("uniconvnet_a"), official, family="uniconvnet")
