"""Joint models keep the shared stages' BatchNorm statistics per modality: one modality's training never shifts
another's evaluation, and each modality's deploy form / timm export equals its own path exactly."""
import copy

import pytest
import timm
import torch

import uniperc
from uniperc.multimodal import MultiModalNet
from conftest import JOINT_TASKS as TASKS, warmed_joint_net

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(3, 5, 7, 5))


def test_one_modality_training_leaves_the_others_statistics_alone():
    model, inputs = warmed_joint_net(batch=6, rounds=4)
    xa, xi = inputs["audio"], inputs["image"]
    with torch.no_grad():
        before = model(xa, "audio")
        model.train()
        for _ in range(3):
            model(xi * 5 - 3, "image")  # shifts image statistics only
        model.eval()
        after = model(xa, "audio")
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    bn = next(model._shared_norms())
    assert not torch.allclose(bn.running_mean_audio, bn.running_mean_image)
    assert int(bn.num_batches_tracked_audio) == 4 and int(bn.num_batches_tracked_image) == 7


@pytest.mark.parametrize("modality", list(TASKS))
def test_each_modality_deploys_and_exports_to_timm_exactly(modality):
    model, inputs = warmed_joint_net(batch=6, rounds=4)
    xa, xi = inputs["audio"], inputs["image"]
    x = xa if modality == "audio" else xi
    with torch.no_grad():
        ref = model(x, modality)
        deployed = model.deploy_copy(modality)
        torch.testing.assert_close(deployed(x, modality), ref, atol=1e-5, rtol=1e-4)
        net = timm.create_model("unireplknet_a", in_chans=TASKS[modality]["in_chans"],
                                num_classes=TASKS[modality]["num_outputs"], **TINY).eval()
        net.load_state_dict(model.timm_state_dict(modality), strict=True)
        torch.testing.assert_close(net(x), ref, atol=0, rtol=0)
    other = "image" if modality == "audio" else "audio"
    with pytest.raises(ValueError, match="deploy form"):
        deployed(xi if other == "image" else xa, other)


def test_a_joint_model_refuses_deploy_form_without_a_modality():
    model, _ = warmed_joint_net(batch=6, rounds=4)
    with pytest.raises(ValueError, match="per modality"):
        uniperc.reparameterize(copy.deepcopy(model))
    with pytest.raises(ValueError, match="name the modality"):
        model.deploy_copy()
    with pytest.raises(ValueError, match="has no stem"):
        model.deploy_copy("video")


def test_one_modality_keeps_the_plain_timm_layout():
    model = MultiModalNet("unireplknet_a", {"audio": TASKS["audio"]}, TINY)
    assert not model.norm_stats_per_modality
    assert not any(k.endswith("_audio") for k in model.state_dict())
    uniperc.reparameterize(copy.deepcopy(model).eval())  # deploy form needs no choice
