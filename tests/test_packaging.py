"""The wheel is a complete package: ``uniperc.modalities`` and the shipped configs inside ``uniperc``, nothing
else at the top level, and a tiny training run works from a fresh venv outside the checkout."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# What the build reads. Built from a copy, because setuptools reuses a checkout's build/ folder and would
# ship whatever an older build left there.
SOURCES = ["pyproject.toml", "README.md", "uniperc", "modalities", "configs"]

E2E = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    import uniperc, uniperc.modalities
    from uniperc.runs import latest
    from uniperc.train import compose, run
    from uniperc.train.config import CONFIG_DIR

    assert compose(["audio"], None, [])["modalities"]["audio"]  # the shipped configs/audio.yaml
    Path("mine.yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    assert compose(["image"], "mine.yaml", [])["model"]["kwargs"]["dims"] == [8, 16, 32, 64]  # relative to the cwd
    result = run(compose(["image"], None, sys.argv[1:]))
    print(json.dumps({"uniperc": uniperc.__file__, "modalities": uniperc.modalities.__file__,
                      "configs": str(CONFIG_DIR),
                      "top_level_modalities": importlib.util.find_spec("modalities") is not None,
                      "editable_hooks": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
                      "steps": result["steps"], "checkpoint": str(latest("run").resolve())}))
""")
TINY = ["output_dir=run", "modalities.image.demo={n_per_class: 6}", "modalities.image.config.image_size=16",
        "modalities.image.batch_size=8", "model.drop_path_rate=0.0",
        "model.kwargs={dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], kernel_sizes: [3, 5, 5, 5]}",
        "train.epochs=1", "train.max_steps=2", "train.warmup_steps=1", "train.checkpoint_every=2",
        "train.threads=1", "train.progress=false", "train.log_every=1"]


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (path,) = dist.glob("uniperc-*.whl")
    return path


def test_wheel_holds_uniperc_only_with_modalities_and_configs_inside(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"uniperc"}  # no top-level modalities/ or configs/
    expected = {f"uniperc/{p.relative_to(ROOT / 'uniperc').as_posix()}" for p in (ROOT / "uniperc").rglob("*.py")}
    expected |= {f"uniperc/modalities/{p.name}" for p in (ROOT / "modalities").glob("*.py")}
    expected |= {f"uniperc/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
                 for p in (ROOT / "configs").rglob("*.yaml")}
    assert "uniperc/configs/accelerate/cpu.yaml" in expected and "uniperc/modalities/audio.py" in expected
    assert not expected - names, f"missing from the wheel (pyproject's package list?): {sorted(expected - names)}"


def test_fresh_venv_trains_from_the_installed_wheel_outside_the_checkout(wheel, tmp_path):
    # A venv that sees the locked dependencies through a path line in a .pth (site-packages folders only): a
    # path line adds the folder to sys.path without running that folder's own .pth files, so the dev venv's
    # editable-install hook stays off and the checkout's uniperc is not importable.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib / "_locked_deps.pth").write_text("\n".join(deps) + "\n")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", UNIPERC_DATA=str(tmp_path / "data"))
    # -I: no PYTHONPATH, no cwd on sys.path. --ignore-installed: never touch the dev venv's uniperc.
    _run([python, "-I", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], env=env)
    work = tmp_path / "work"
    work.mkdir()
    out = json.loads(_run([python, "-I", "-c", E2E, *TINY], cwd=work, env=env).splitlines()[-1])
    for key in ("uniperc", "modalities", "configs"):
        assert Path(out[key]).is_relative_to(purelib), (key, out[key])
    assert not out["top_level_modalities"] and not out["editable_hooks"]
    assert out["steps"] == 2 and Path(out["checkpoint"]).is_relative_to(work / "run")
    assert (work / "run" / "metrics.json").is_file() and (work / "run" / "model" / "model.safetensors").is_file()
    assert list((tmp_path / "data" / "image").iterdir())  # demo data went to UNIPERC_DATA
