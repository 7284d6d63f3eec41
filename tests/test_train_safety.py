"""Nothing is lost: bad requests leave a run folder untouched, fresh starts keep the old checkpoints until the new
run has its own, and a resume with a changed config is refused."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from uniperc.runs import complete_checkpoints, latest
from uniperc.train import compose, run
from uniperc.train.checkpoint import SET_ASIDE
from uniperc.train.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
TINY = str(CONFIG_DIR / "tiny.yaml")
BAD = {
    "model.kwargs.dimz=[8,16,32,64]": "dimz",
    "model.kwargs.dims=[8,16]": "dims",
    "train.lr=fast": "train.lr",
    "model.mixer=nosuchmixer": "model.mixer",
    "modalities.image.config.image_size=-3": "image_size",
    "model.backbone=nosuchnet": "model.backbone",
    "modalities.image.stem=learned_projection": "modalities.image.stem",
}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    run(compose(["image"], TINY, [f"output_dir={out}"]))
    assert complete_checkpoints(out)
    return out


def test_bad_configs_exit_with_one_line_and_leave_checkpoints_byte_identical(trained):
    before = _fingerprint(trained / "checkpoints")
    config_before = (trained / "config.yaml").read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {bad: subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", TINY, "--modality", "image",
                                    "--output-dir", str(trained), "--set", bad], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for bad in BAD}
    for bad, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, bad
        assert "Traceback" not in err, (bad, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and BAD[bad] in last, (bad, last)
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert _fingerprint(trained / "checkpoints") == before
    assert (trained / "config.yaml").read_bytes() == config_before


def test_resume_refuses_a_changed_config_unless_forced(trained, tmp_path):
    config = compose(["image"], TINY, [f"output_dir={trained}", "model.kwargs.dims=[8,16,32,48]"])
    before = _fingerprint(trained / "checkpoints")
    with pytest.raises(ValueError, match=r"model\.kwargs\.dims: \[8, 16, 32, 64\] -> \[8, 16, 32, 48\]"):
        run(config, resume=True)
    assert _fingerprint(trained / "checkpoints") == before
    # a changed number of epochs is not a changed model: resuming with it is allowed
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(trained, copy)
    result = run(compose(["image"], TINY, [f"output_dir={copy}", "train.max_steps=6", "train.epochs=3"]), resume=True)
    assert result["steps"] == 6
    forced = run(compose(["image"], TINY, [f"output_dir={copy}", "train.max_steps=8", "train.epochs=4",
                                           "modalities.image.label_smoothing=0.2"]), resume=True, force=True)
    assert forced["steps"] == 8


def test_fresh_start_sets_old_checkpoints_aside_until_its_own_first_checkpoint(trained, tmp_path, monkeypatch):
    import shutil

    import uniperc.train.loop as loop

    folder = tmp_path / "again"
    shutil.copytree(trained, folder)
    old = _fingerprint(folder / "checkpoints")

    def crash(session):
        raise RuntimeError("killed before the first checkpoint")

    monkeypatch.setattr(loop, "fit", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run(compose(["image"], TINY, [f"output_dir={folder}"]))
    assert _fingerprint(folder / SET_ASIDE) == old  # moved aside whole, nothing deleted
    monkeypatch.undo()
    result = run(compose(["image"], TINY, [f"output_dir={folder}"]))
    assert not (folder / SET_ASIDE).exists() and latest(folder).name == "step_00000004"
    assert result["steps"] == 4


@pytest.mark.parametrize("settings, message", [
    (["config.projection=points", "stem=backbone"], "'backbone' cannot read point_cloud inputs with projection 'points'"),
    (["stem=learned_projection"], "'learned_projection' cannot read point_cloud inputs with projection 'fixed'"),
    (["stem=station_embedding"], "'station_embedding' is a stem of weather"),
])
def test_stems_that_do_not_fit_are_refused_when_read(settings, message):
    """A stem that cannot read what the adapter gives: refused by ``resolve``, before any data, naming the key."""
    from uniperc.train.config import resolve

    config = compose(["point_cloud"], None, [f"modalities.point_cloud.{s}" for s in settings])
    with pytest.raises(ValueError, match=r"modalities\.point_cloud\.stem.*" + re.escape(message)):
        resolve(config)


@pytest.mark.parametrize("setting", ["view_layout=batch", "projection=points"])
def test_multi_view_and_point_inputs_are_accepted_when_read(setting):
    """Once refused (no stem took them), both now have a model: views folded into the batch, LearnedProjection."""
    from uniperc.train.config import resolve

    section = resolve(compose(["point_cloud"], None, [f"modalities.point_cloud.config.{setting}"]))
    assert section["modalities"]["point_cloud"]["stem"] == "auto"
