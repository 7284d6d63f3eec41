"""Shared test helpers, and one temporary data folder for the whole run."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def pytest_configure(config):
    """Demo data never goes to the user's ``~/.cache/uniperc``: the controlling process points
    ``UNIPERC_DATA`` at a fresh temporary folder before any worker starts (xdist workers, subprocesses and
    notebook kernels inherit it), and removes it at the end. Modules that want their own folder still set one."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has set it
        return
    config._uniperc_data = os.environ["UNIPERC_DATA"] = tempfile.mkdtemp(prefix="uniperc-test-data-")


def pytest_unconfigure(config):
    folder = getattr(config, "_uniperc_data", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def load_reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a ../shared/reference key list (official state dicts, names and shapes only)."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference key list {path} is not present")
    shapes = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes; BN variances positive, counters integer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.2
    return out


def randomize_bn_and_scales(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN running statistics, affine parameters and layer scales non-trivial random values, so
    re-parameterisation is checked on something other than identity BNs and 1e-6 scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.5)
        for name, param in model.named_parameters():
            if param.ndim == 1 and re.search(r"(gamma\w*|layer_scale\w*|grn\.(weight|bias))$", name):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
    return model


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().sum() / b.abs().sum()).item()


#: two modalities with very different input statistics, for joint-model tests
JOINT_TASKS = {"audio": dict(in_chans=1, task="classification", num_outputs=5),
               "image": dict(in_chans=3, task="classification", num_outputs=4)}


def warmed_joint_net(batch: int = 4, rounds: int = 3):
    """A tiny audio + image ``MultiModalNet`` (UniRepLKNet shell, non-identity blocks) whose per-modality
    BatchNorm statistics have seen ``rounds`` batches of very different inputs; in eval mode, with the inputs."""
    from uniperc.multimodal import MultiModalNet

    torch.manual_seed(0)
    kwargs = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(3, 5, 7, 5))
    model = randomize_bn_and_scales(MultiModalNet("unireplknet_a", JOINT_TASKS, kwargs))
    inputs = {"audio": torch.randn(batch, 1, 32, 32) * 4 + 2, "image": torch.randn(batch, 3, 32, 32) * 0.2}
    model.train()
    with torch.no_grad():
        for _ in range(rounds):
            for name, x in inputs.items():
                model(x, name)
    return model.eval(), inputs


@pytest.fixture(scope="module")
def module_data_cache(tmp_path_factory):
    """A private demo-data folder for one module (tiny sets, generated once per module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UNIPERC_DATA", str(tmp_path_factory.mktemp("data")))
    yield
    mp.undo()
