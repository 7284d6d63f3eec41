"""Registry, config handling and the shared split / caching machinery of ``uniperc.modalities``."""
from __future__ import annotations

from pathlib import Path

import pytest

import uniperc.modalities as modalities
from uniperc.modalities.base import Modality, default_cache_dir, split_by_key
from uniperc.tasks import list_tasks

ALL = ["audio", "image", "point_cloud", "video", "weather"]


def test_registry_lists_every_modality_file():
    assert modalities.list_modalities() == ALL


def test_unknown_modality_lists_the_known_names():
    with pytest.raises(ValueError, match="audio.*image.*point_cloud.*video.*weather"):
        modalities.get("lidar")


@pytest.mark.parametrize("name", ALL)
def test_each_modality_declares_the_api(name):
    m = modalities.get(name)
    assert isinstance(m, Modality) and m.name == name and m.task in list_tasks()
    cfg = m.default_config()
    assert isinstance(cfg, dict) and cfg and m.default_config() is not cfg  # a fresh dict each call
    with pytest.raises(ValueError, match="unknown config key"):
        m.config({"no_such_setting": 1})
    with pytest.raises(ValueError, match="unknown source"):
        m.load(source="ftp")


@pytest.mark.parametrize("name, settings, chans, size", [
    ("audio", {"n_mels": 24, "target_frames": 50}, 1, (24, 50)),
    ("image", {"image_size": 40}, 3, (40, 40)),
    ("point_cloud", {"views": 3, "normal_mode": "xyz", "image_size": 20}, 12, (20, 20)),
    ("point_cloud", {"views": 2, "normal_mode": "none", "image_size": 24}, 2, (24, 24)),
    ("video", {"num_frames": 6, "frame_size": 10, "layout": "channels"}, 18, (10, 10)),
])
def test_in_chans_and_input_size_follow_the_config(name, settings, chans, size):
    m = modalities.get(name)
    cfg = m.config(settings)
    assert m.in_chans(cfg) == chans and tuple(m.input_size(cfg)) == size


def test_split_by_key_keeps_keys_together_and_is_stable():
    keys = [f"spk{i % 50}" for i in range(1000)]
    a = split_by_key(keys, (0.1, 0.2), seed=0)
    assert a == split_by_key(keys, (0.1, 0.2), seed=0)
    by_key = {}
    for k, s in zip(keys, a):
        by_key.setdefault(k, set()).add(s)
    assert all(len(s) == 1 for s in by_key.values())
    assert {"train", "validation", "test"} == set(a)
    assert a != split_by_key(keys, (0.1, 0.2), seed=1)


def test_the_test_run_keeps_demo_data_in_a_temporary_folder():
    import tempfile

    assert default_cache_dir("audio").is_relative_to(Path(tempfile.gettempdir()))


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPERC_DATA", str(tmp_path))
    assert default_cache_dir("audio") == tmp_path / "audio"
    monkeypatch.delenv("UNIPERC_DATA")
    assert default_cache_dir("audio").parts[-3:] == (".cache", "uniperc", "audio")


def test_demo_is_generated_once_then_reused(tmp_path, monkeypatch):
    m = modalities.get("image")
    calls = []
    real = m.make_demo
    monkeypatch.setattr(m, "make_demo", lambda root, seed=0, **kw: calls.append(1) or real(root, seed=seed, **kw))
    r1 = m.ensure_demo(cache_dir=tmp_path, seed=0, n_per_class=2)
    r2 = m.ensure_demo(cache_dir=tmp_path, seed=0, n_per_class=2)
    r3 = m.ensure_demo(cache_dir=tmp_path, seed=1, n_per_class=2)
    assert r1 == r2 != r3 and len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written folders left


def test_modalities_sharing_a_cache_dir_do_not_collide(tmp_path, monkeypatch):
    roots = []
    for name in ("image", "video"):
        m = modalities.get(name)
        monkeypatch.setattr(m, "make_demo", lambda root, seed=0, **kw: root)
        roots.append(m.ensure_demo(cache_dir=tmp_path, seed=0, n_per_class=4))
    assert roots[0] != roots[1] and roots[0].name.startswith("image-") and roots[1].name.startswith("video-")
