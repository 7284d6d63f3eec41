"""2-process CPU DDP (gloo) gives what the math says: the same step as 1 process on the concatenated batch.

What is compared: with UniConvNet's whole RFA block (``block=rfa``: LayerNorm only; no BatchNorm, whose batch statistics are per process
under DDP and would legitimately differ from a 2x-batch run), no drop path and per-sample seeded augmentation,
two processes with batch 4 each see exactly the samples one process sees with batch 8, and DDP's gradient
average equals the gradient of the 8-sample mean loss. So after two AdamW steps the weights must agree up to
float summation order, and the gathered test metrics must agree. The run itself also checks that both
replicas hold identical parameters (``replicas_checked``).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uniperc.train import compose, run
from uniperc.train.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
COMMON = ["model.kwargs.block=rfa", "train.max_steps=2", "train.warmup_steps=0", "train.trackers=[]",
          "train.checkpoint_every=100", "train.cpu=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(tmp_path, modalities, sets):
    env = dict(os.environ, UNIPERC_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIG_DIR / "accelerate" / "cpu.yaml"), "--main_process_port", str(_free_port()), str(ROOT / "train.py"),
           "--config", str(CONFIG_DIR / "tiny.yaml"), "--modality", modalities, *[f"--set={s}" for s in sets]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env, proc.stderr


def test_joint_training_with_idle_heads_keeps_replicas_identical(tmp_path):
    """Each batch leaves the other modality's stem and head idle; DDP must cope (find_unused_parameters), also
    when an accumulation window spans batches of both modalities, and the replicas must stay identical."""
    _, stderr = _launch_two(tmp_path, "audio,image", ["train.cpu=true", "train.max_steps=6", "train.grad_accum=2",
                                          "train.interleave=round_robin", f"output_dir={tmp_path / 'joint'}"])
    result = json.loads((tmp_path / "joint" / "metrics.json").read_text())
    assert result["num_processes"] == 2 and result["replicas_checked"]
    assert set(result["metrics"]["test"]) == {"audio", "image"}
    # every depthwise kernel's gradient has its parameter's layout: DDP copies none into its buckets with a warning
    assert "Grad strides do not match bucket view strides" not in stderr


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    env, _ = _launch_two(tmp_path, "image", COMMON + ["modalities.image.batch_size=4", f"output_dir={tmp_path / 'two'}"])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["replicas_checked"]

    os.environ["UNIPERC_DATA"] = env["UNIPERC_DATA"]
    try:
        one = run(compose(["image"], str(CONFIG_DIR / "tiny.yaml"),
                          COMMON + ["modalities.image.batch_size=8", f"output_dir={tmp_path / 'one'}"]))
    finally:
        del os.environ["UNIPERC_DATA"]
    assert one["num_processes"] == 1
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-6, rtol=1e-5, msg=key)
    for key, value in one["metrics"]["test"]["image"].items():
        assert two["metrics"]["test"]["image"][key] == pytest.approx(value, abs=1e-4), key
