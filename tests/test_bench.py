"""The backbone benchmark runs end to end and reports a smaller deploy form."""
from uniperc.bench.backbone import measure


def test_backbone_benchmark_measures_all_three_modes():
    r = measure("unireplknet_a", batch=2, size=32, repeats=1, device="cpu")
    assert r["train"] > 0 and r["eval"] > 0 and r["deploy"] > 0
    assert r["deploy_params_M"] < r["params_M"]


def test_mixer_benchmark_swaps_only_the_mixer():
    from uniperc.bench.mixers import measure as measure_mixer

    rows = {m: measure_mixer(m, (1, 1, 1, 1), (16, 32, 64, 128), batch=2, size=32, repeats=1, device="cpu")
            for m in ("dilated_reparam", "peripheral", "lka", "rfa")}
    assert all(r["gflops"] > 0 and r["train_img_s"] > 0 and r["deploy_img_s"] > 0 for r in rows.values())
    # the dilated branches and BNs fold away; the head and frame are the same for every mixer
    assert rows["dilated_reparam"]["deploy_params_M"] < rows["dilated_reparam"]["params_M"]
    assert len({round(r["params_M"], 6) for r in rows.values()}) == 4
