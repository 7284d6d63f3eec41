"""Image modality: digits demo, imagefolder loading, timm transforms, bad files."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import uniperc.modalities as modalities

m = modalities.get("image")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("image")
    return m.load("demo", cfg=m.demo_config(), cache_dir=cache, n_per_class=5), cache


def test_demo_splits_schema_and_samples(demo):
    dsd, _ = demo
    assert set(dsd) == {"train", "validation", "test"}
    assert m.label_names(dsd) == [str(i) for i in range(10)] and m.num_outputs(dsd) == 10
    feats = dsd["train"].features
    assert type(feats["image"]).__name__ == "Image" and type(feats["label"]).__name__ == "ClassLabel"
    for split in dsd.values():
        s = split[0]
        assert s["inputs"].shape == (3, 32, 32) and s["inputs"].dtype == torch.float32
        assert s["labels"].dtype == torch.long and s["labels"].ndim == 0
    assert m.in_chans() == 3 and m.input_size(m.demo_config()) == (32, 32)


def test_train_split_augments_and_eval_split_does_not(demo):
    dsd, _ = demo
    torch.manual_seed(0)
    a, b = dsd["train"][0]["inputs"], dsd["train"][0]["inputs"]
    assert not torch.equal(a, b)
    assert torch.equal(dsd["test"][0]["inputs"], dsd["test"][0]["inputs"])


def test_demo_is_deterministic_from_seed(tmp_path):
    def digest(root):
        h = hashlib.sha1()
        for f in sorted(root.rglob("*.png")):
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
        return h.hexdigest()

    a = digest(m.make_demo(tmp_path / "a", seed=3, n_per_class=2))
    b = digest(m.make_demo(tmp_path / "b", seed=3, n_per_class=2))
    c = digest(m.make_demo(tmp_path / "c", seed=4, n_per_class=2))
    assert a == b != c


def test_imagefolder_without_split_folders_is_split_by_hash(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    dsd = m.load("folder", path=tmp_path, cfg={"image_size": 16})
    assert m.label_names(dsd) == ["cat", "dog"]
    assert sum(len(s) for s in dsd.values()) == 40 and all(len(s) > 0 for s in dsd.values())
    assert dsd["validation"][0]["inputs"].shape == (3, 16, 16)


def test_read_file_and_bad_files(tmp_path):
    f = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30), 128, np.uint8), mode="L").save(f)  # grey -> RGB
    x = m.read_file(f, {"image_size": 24})
    assert x.shape == (3, 24, 24)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        m.read_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        m.read_file(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="needs path"):
        m.load("folder")


def test_hub_schema_is_imagenet():
    spec = m.hub_spec()
    assert spec.name == "ILSVRC/imagenet-1k" and spec.num_classes == 1000
    assert spec.columns == {"image": "image", "label": "label"} and spec.splits["test"] == "validation"
