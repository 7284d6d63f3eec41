"""Crash safety: SIGKILL a real training process, resume it, and get exactly the uninterrupted run's result.

Deterministic CPU (one thread); drop path on, so the global RNG (restored from the checkpoint) matters too;
augmentation is seeded per sample, so skipping the consumed batches of the interrupted epoch reproduces it.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uniperc.train import compose, run
from uniperc.runs import MARKER, complete_checkpoints, latest
from uniperc.train.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SETTINGS = ["modalities.image.demo.n_per_class=14", "train.epochs=3", "train.max_steps=null",
            "train.checkpoint_every=3", "model.drop_path_rate=0.2", "train.keep_checkpoints=50"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ, UNIPERC_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG_DIR / "tiny.yaml"), "--modality", "image",
           *[f"--set={s}" for s in SETTINGS + [f"output_dir={killed}"]]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(killed)
        if done and int(done[-1].name.split("_")[1]) >= 4:  # mid-way through epoch 1 at the earliest
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = latest(killed)
    steps_done = int(last.name.split("_")[1])

    # Debris a crash can leave: a temp folder and a folder without the marker. Neither may be picked up.
    fake = killed / "checkpoints" / "step_99999999"
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{}")
    (killed / "checkpoints" / ".tmp-step_99999998").mkdir()
    assert latest(killed) == last and (last / MARKER).is_file()
    (fake / "trainer_state.json").unlink()
    fake.rmdir()

    os.environ["UNIPERC_DATA"] = env["UNIPERC_DATA"]
    try:
        config = compose(["image"], str(CONFIG_DIR / "tiny.yaml"), SETTINGS)
        resumed = run(dict(config, output_dir=str(killed)), resume=True)
        straight = run(dict(config, output_dir=str(tmp_path / "straight")))
    finally:
        del os.environ["UNIPERC_DATA"]
    assert 0 < steps_done < straight["steps"] == resumed["steps"]
    assert not list((killed / "checkpoints").glob(".tmp-*"))  # debris cleaned by the next save
    assert resumed["metrics"] == straight["metrics"]
    a = load_file(str(killed / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # training-loss history after the resume point is the same too
    tail = [h for h in straight["history"] if h["kind"] == "train" and h["step"] > steps_done]
    assert [h["loss"] for h in tail] == pytest.approx(
        [h["loss"] for h in resumed["history"] if h["kind"] == "train" and h["step"] > steps_done], abs=0)
