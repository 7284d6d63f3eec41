"""Video modality: true mosaic tiling, frame sampling rule, PyAV round trip, layouts, bad files."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import uniperc.modalities as modalities
from uniperc.modalities.video import decode_frames, grid_shape, mosaic, sample_indices, to_rgb

m = modalities.get("video")


def test_mosaic_puts_frame_t_in_tile_t():
    t, c, h, w = 6, 3, 4, 5
    frames = torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1).expand(t, c, h, w)
    img = mosaic(frames)
    gh, gw = grid_shape(t)
    assert (gh, gw) == (2, 3) and img.shape == (c, gh * h, gw * w)
    for k in range(t):
        r, col = divmod(k, gw)
        assert torch.all(img[:, r * h : (r + 1) * h, col * w : (col + 1) * w] == k)
    # the official code's plain reshape is not a tiling: its first tile mixes several frames
    naive = frames.reshape(c, gh * h, gw * w)
    assert naive[:, :h, :w].unique().numel() > 1
    assert grid_shape(16) == (4, 4) and grid_shape(7) == (1, 7)


def test_frame_sampling_rule():
    assert sample_indices(3, 8, train=False) == [0, 0, 0, 1, 1, 2, 2, 2]  # short clip: repeat in order
    assert sample_indices(100, 4, train=False) == [12, 37, 62, 87]  # segment centres
    g = torch.Generator().manual_seed(0)
    idx = sample_indices(100, 4, train=True, generator=g)
    assert all(25 * k <= i < 25 * (k + 1) for k, i in enumerate(idx))  # one random frame per segment
    with pytest.raises(ValueError, match="no frames"):
        sample_indices(0, 4, train=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("video")
    dsd = m.load("demo", cfg=m.demo_config(), cache_dir=cache, n_per_class=3, size=32, min_frames=5, max_frames=10)
    return dsd, next(cache.iterdir())


def test_demo_round_trip_and_motion_direction(demo):
    dsd, root = demo
    assert m.num_outputs(dsd) == 12 and "circle_right" in m.label_names(dsd)
    files = sorted(root.rglob("*.mp4"))
    assert len(files) == 36 and {f.parents[1].name for f in files} == {"train", "validation", "test"}
    for label, axis, sign in (("square_right", 1, 1), ("triangle_up", 0, -1), ("circle_left", 1, -1)):
        f = next((root / "train" / label).glob("*.mp4"))
        frames = decode_frames({"bytes": None, "path": str(f)}, 4, False, "t").astype(float)
        bg = np.median(frames[0].reshape(-1, 3), axis=0)
        centroids = []
        for fr in frames:  # pixels far from the background colour are the shape
            ys, xs = np.nonzero(np.abs(fr - bg).sum(-1) > 120)
            centroids.append((ys.mean(), xs.mean())[axis])
        assert sign * (centroids[-1] - centroids[0]) > 3, label
    s = dsd["test"][0]
    assert s["inputs"].shape == (3, 64, 128) and s["labels"].dtype == torch.long
    assert torch.equal(dsd["test"][0]["inputs"], s["inputs"])


def test_reused_reformatter_gives_pyav_pixels_across_frame_sizes(demo, tmp_path):
    """The per-thread reformatter keeps its context between clips; a clip of another size must still convert right."""
    import av

    _, root = demo
    small = next(root.rglob("*.mp4"))
    big = tmp_path / "big"
    m.make_demo(big, seed=1, n_per_class=1, size=40, min_frames=3, max_frames=3)
    for f in (small, next(big.rglob("*.mp4")), small):
        with av.open(str(f)) as container:
            for frame in container.decode(container.streams.video[0]):
                assert np.array_equal(to_rgb(frame), frame.to_ndarray(format="rgb24")), f


def test_channels_layout_and_short_clip_file(demo, tmp_path):
    _, root = demo
    f = next(root.rglob("*.mp4"))
    cfg = m.config(num_frames=24, frame_size=16, layout="channels")  # longer than any demo clip
    x = m.read_file(f, cfg)
    assert x.shape == (72, 16, 16) and m.in_chans(cfg) == 72 and m.input_size(cfg) == (16, 16)
    assert torch.equal(x[:3], x[3:6])  # repeated frame (rule for clips shorter than num_frames)


def test_ucf101_layout_uses_group_split(demo, tmp_path):
    _, root = demo
    src = sorted(root.rglob("*.mp4"))
    for cls, offset in (("ApplyLipstick", 0), ("Archery", 1)):
        (tmp_path / cls).mkdir()
        for g in range(1, 10):
            shutil.copy(src[(g + offset) % len(src)], tmp_path / cls / f"v_{cls}_g{g:02d}_c01.mp4")
    dsd = m.load("folder", path=tmp_path, cfg={"num_frames": 4, "frame_size": 16}, val_fraction=0.5)
    assert m.label_names(dsd) == ["ApplyLipstick", "Archery"]
    test_files = dsd["test"].with_format(None)["video"]
    assert len(test_files) == 14 and all(int(v["path"].rsplit("_g", 1)[1][:2]) <= 7 for v in test_files)
    assert len(dsd["train"]) + len(dsd["validation"]) == 4 and len(dsd["validation"]) > 0
    assert dsd["train"][0]["inputs"].shape == (3, 32, 32)


def test_corrupt_video_raises_naming_the_file(tmp_path):
    f = tmp_path / "broken.mp4"
    f.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20)
    with pytest.raises(ValueError, match="broken.mp4"):
        m.read_file(f)


def test_hub_spec_is_ucf101_frames():
    spec = m.hub_spec()
    assert spec.name == "flwrlabs/ucf101" and spec.num_classes == 101 and spec.columns["image"] == "frames"


def _raw(ds, label_name):
    """The first raw row (no transform) of class ``label_name``."""
    raw = ds.with_format(None)
    y = raw.features["label"].str2int(label_name)
    return next(r for r in raw if r["label"] == y)


def _centroid_track(x, cols):
    """Horizontal centre of the brightest pixels of each mosaic tile (contrast colour: the shape is bright)."""
    gh, gw = grid_shape(cols)
    s = x.shape[-1] // gw
    tiles = x.sum(0).reshape(gh, s, gw, s).permute(0, 2, 1, 3).reshape(gh * gw, s, s)
    track = []
    for tile in tiles:
        ys, xs = torch.nonzero(tile > tile.max() * 0.5, as_tuple=True)
        track.append(xs.float().mean().item())
    return track


def test_flip_mirrors_the_direction_label(demo):
    dsd, _ = demo
    cfg = {**m.fitted_config(dsd), "hflip": 1.0, "train_scale": [1.0, 1.0]}
    names = m.label_names(dsd)
    raw = _raw(dsd["train"], "circle_left")
    torch.manual_seed(3)
    x_flip, y_flip = m.example(raw, cfg, train=True)
    torch.manual_seed(3)
    x_keep, y_keep = m.example(raw, {**cfg, "hflip": 0.0}, train=True)
    assert names[y_keep] == "circle_left" and names[y_flip] == "circle_right"
    assert torch.equal(x_flip, mosaic_flip(x_keep, cfg))
    track = _centroid_track(x_flip, cfg["num_frames"])
    assert track[-1] - track[0] > 3  # the flipped clip really moves right
    up = _raw(dsd["train"], "square_up")
    assert names[m.example(up, cfg, train=True)[1]] == "square_up"  # vertical motion survives a flip


def mosaic_flip(x, cfg):
    """Mirror every tile of a mosaic (what flipping each frame before tiling gives)."""
    gh, gw = grid_shape(cfg["num_frames"])
    from einops import rearrange

    frames = rearrange(x, "c (gh h) (gw w) -> (gh gw) c h w", gh=gh, gw=gw)
    return mosaic(frames.flip(-1))


def test_mirror_labels_are_checked():
    with pytest.raises(ValueError, match="both ways"):
        m.config(mirror_labels={"a_left": "a_right"})
    with pytest.raises(ValueError, match="mirror_labels"):
        m.config(mirror_labels={"a": 1})


def test_mirror_labels_must_name_real_classes(demo):
    _, root = demo
    with pytest.raises(ValueError, match="mirror_labels names class"):
        m.load("folder", path=root, cfg=m.config(m.demo_config(), mirror_labels={"disc_left": "disc_right",
                                                                              "disc_right": "disc_left"}))


def test_labels_agree_across_splits_and_with_folders(demo):
    dsd, _ = demo
    names = m.label_names(dsd)
    for split in ("train", "validation", "test"):
        raw = dsd[split].with_format(None)
        assert raw.features["label"].names == names
        counts = np.bincount(raw["label"], minlength=len(names))
        assert (counts == counts[0]).all() and counts[0] > 0, split  # balanced
        for row in raw:  # the label is the class folder the file sits in
            assert names[row["label"]] == row["video"]["path"].split("/")[-2]


def test_contrast_colour_ignores_the_sign_of_the_contrast(demo):
    _, root = demo
    f = next((root / "train" / "triangle_down").glob("*.mp4"))
    frames = decode_frames({"bytes": None, "path": str(f)}, 4, False, "t")
    cfg = m.config(colour="contrast", frame_size=16)
    a = m.frames_tensor(frames, cfg, train=False)
    b = m.frames_tensor(255 - frames, cfg, train=False)
    # equal up to uint8 rounding of the resize (a few levels of 255, divided by std ~0.22)
    assert torch.allclose(a, b, atol=0.06) and a.min() >= 0
    rgb = m.frames_tensor(frames, m.config(frame_size=16), train=False)
    assert not torch.allclose(rgb, m.frames_tensor(255 - frames, m.config(frame_size=16), train=False), atol=0.06)


def test_loads_are_deterministic(demo):
    from uniperc.train.data import SeededAugment

    dsd, root = demo
    f = next((root / "test" / "square_right").glob("*.mp4"))
    assert torch.equal(m.read_file(f), m.read_file(f))
    a, b = SeededAugment(dsd["train"], seed=1), SeededAugment(dsd["train"], seed=1)
    assert torch.equal(a[5]["inputs"], b[5]["inputs"]) and torch.equal(a[5]["labels"], b[5]["labels"])
    torch.manual_seed(0)
    first = dsd["train"][5]["inputs"]
    torch.manual_seed(0)
    assert torch.equal(dsd["train"][5]["inputs"], first)  # train-time frame sampling draws from the seeded RNG
