"""The backbone benchmark runs end to end and reports a smaller deploy form."""
from uniperc.bench.backbone import measure


def test_backbone_benchmark_measures_all_three_modes():
    r = measure("unireplknet_a", batch=2, size=32, repeats=1, device="cpu")
    assert r["train"] > 0 and r["eval"] > 0 and r["deploy"] > 0
    assert r["deploy_params_M"] < r["params_M"]
