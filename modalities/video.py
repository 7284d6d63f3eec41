"""Video modality: a clip -> ``num_frames`` RGB frames -> one image (mosaic) or time-as-channels.

Decoding: PyAV (FFmpeg libraries bundled in its wheel; no system FFmpeg, no torchcodec). Raw rows keep
the encoded file (``{"bytes", "path"}``) or, for Hub frame tables, the list of frame images; decoding
happens in the transform.

Frame sampling (``num_frames = T`` from a clip of ``N`` frames, TSN-style): the clip is cut into ``T``
equal segments; evaluation takes the centre frame of each, training a random frame of each. The rule
for **short clips** (``N < T``) is the same formula, so frames are repeated in temporal order
(nearest-frame stretching, e.g. N=3, T=8 -> 0 0 0 1 1 2 2 2); nothing is padded with black frames.
A clip with no decodable frame raises ``ValueError``.

Adapter: frames resized to ``frame_size`` (train: one random resized crop, scale ``train_scale``, shared
by all frames, and a horizontal flip with probability ``hflip``; eval: resize of the short side + centre
crop), normalised by ``mean``/``std``, then laid out by ``layout``.

A horizontal flip turns "moving left" into "moving right", so flips are drawn in :meth:`VideoModality.example`,
where the label is known: ``mirror_labels`` maps each class to the class its mirror image shows (classes not
listed are mirror-symmetric, as UCF101's actions are) and the label of a flipped clip is mapped through it.
The demo declares its left/right pairs, so it trains with flips that keep every label true.

``colour``: ``"rgb"`` (default) keeps the colours; ``"contrast"`` replaces each pixel by its absolute
difference from the clip's background colour (per-channel median over all frames and pixels), for data whose
classes do not depend on colour. The demo draws a random background and a random foreground colour per
clip (the sign of the contrast differs per channel), which a small network otherwise memorises clip by clip.

* ``"mosaic"`` (default): a true tiling ``einops.rearrange(x, "(gh gw) c h w -> c (gh h) (gw w)")``:
  frame ``t`` is the tile at row ``t // gw``, column ``t % gw``; ``gh`` = the largest divisor of T that is
  <= sqrt(T). C' = 3, H = gh * frame_size, W = gw * frame_size (T=16, 56 px -> 3 x 224 x 224). UniRepLKNet's
  released code used a plain ``reshape(B, C, 4H, 4W)``, which interleaves rows of different frames
  instead of tiling them.
* ``"channels"``: time to channels ``"t c h w -> (t c) h w"``: C' = 3T, H = W = frame_size.

Sources: ``demo`` = generated clips of moving shapes (classes = shape x motion direction, 12 classes),
written as H.264 ``.mp4`` with PyAV in the Kinetics layout and decoded back; ``folder`` = Kinetics layout
``root/{train,validation|val,test}/<class>/*.mp4`` or UCF101 layout ``root/<Class>/v_<Class>_gXX_cYY.avi``
(official split lists ``ucfTrainTestlist/{train,test}list0K.txt`` when present, else split 1's rule: groups
1-7 are test); ``hub`` = UCF101 as a frame table (``flwrlabs/ucf101``), regrouped into clips.
"""

from __future__ import annotations

import io
import math
import re
import threading
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .base import HubSpec, Modality, split_by_key

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
DEMO_SHAPES = ("circle", "square", "triangle")
DEMO_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_UCF_NAME = re.compile(r"v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)", re.IGNORECASE)


def sample_indices(n: int, t: int, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """Segment-based frame indices (see the module docstring); works for ``n < t`` by repetition."""
    if n <= 0:
        raise ValueError("video: clip has no frames")
    if train:
        offs = torch.rand(t, generator=generator).tolist()
    else:
        offs = [0.5] * t
    return [min(n - 1, int((k + o) * n / t)) for k, o in enumerate(offs)]


def grid_shape(t: int) -> tuple[int, int]:
    """(rows, cols) of the mosaic: rows = largest divisor of ``t`` not above sqrt(t)."""
    rows = max(d for d in range(1, int(math.isqrt(t)) + 1) if t % d == 0)
    return rows, t // rows


def mosaic(frames: torch.Tensor) -> torch.Tensor:
    """``T x C x h x w`` -> ``C x (gh h) x (gw w)``; frame t at tile (t // gw, t % gw)."""
    gh, gw = grid_shape(frames.shape[0])
    return rearrange(frames, "(gh gw) c h w -> c (gh h) (gw w)", gh=gh, gw=gw)


_RGB = threading.local()


def to_rgb(frame) -> np.ndarray:
    """One decoded frame -> ``H x W x 3`` uint8, through this thread's reusable reformatter.

    ``VideoFrame.to_ndarray(format="rgb24")`` builds a new swscale context for every frame (23 ms for a
    48 x 48 frame, measured with PyAV 18); one ``VideoReformatter`` per thread keeps its context while the
    frame size and format stay the same (0.1 ms), with identical pixels.
    """
    from av.video.reformatter import VideoReformatter

    if not hasattr(_RGB, "reformatter"):
        _RGB.reformatter = VideoReformatter()
    return _RGB.reformatter.reformat(frame, format="rgb24").to_ndarray()


def decode_frames(value, num_frames: int, train: bool, what: str) -> np.ndarray:
    """Decode the sampled frames of a video (bytes / path / list of images) -> ``T x H x W x 3`` uint8."""
    import av

    if isinstance(value, dict) and value.get("frames"):
        from .image import to_pil

        frames = value["frames"]
        idx = sample_indices(len(frames), num_frames, train)
        return np.stack([np.asarray(to_pil(frames[i], what)) for i in idx])
    src = value
    if isinstance(value, dict):
        src = value.get("bytes") or value.get("path")
        what = f"{what} {value.get('path') or ''}".strip()
    if src is None:
        raise ValueError(f"{what}: video has neither bytes nor path")
    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as container:
            if not container.streams.video:
                raise ValueError(f"{what}: file has no video stream")
            stream = container.streams.video[0]
            # one decoder thread: DataLoader workers already decode clips in parallel, and FFmpeg's own
            # threads cost more to start than a short clip takes to decode (6.3 vs 0.9 ms per demo clip)
            stream.codec_context.thread_count = 1
            frames = list(container.decode(stream))
            if not frames:
                raise ValueError(f"{what}: video has no decodable frames")
            idx = sample_indices(len(frames), num_frames, train)
            rgb = {i: to_rgb(frames[i]) for i in set(idx)}  # convert only sampled frames
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{what}: cannot decode video ({e})") from None
    return np.stack([rgb[i] for i in idx])


class VideoModality(Modality):
    name = "video"
    task = "classification"
    file_extensions = VIDEO_EXTENSIONS
    input_field = "video"  # a user's dataset: a Video column / {"bytes", "path"} structs, or lists of frame images
    input_media = "Video"  # or a column of file paths / bytes
    hub = HubSpec(
        name="flwrlabs/ucf101",
        config=None,
        columns={"image": "frames", "clip_id": "clip_id", "frame": "frame", "label": "label"},
        splits={"train": "train", "test": "test"},
        num_classes=101,
        decode_off=("image",),
        notes="UCF101 stored one row per frame (image, video_id, clip_id, frame, label); rows are grouped "
        "by clip_id and ordered by frame; validation is carved from train by a hash of video_id; the split "
        "names on the Hub could not be verified offline",
    )

    def default_config(self) -> dict:
        return {
            "num_frames": 16,
            "frame_size": 56,
            "layout": "mosaic",  # or "channels"
            "mean": list(KINETICS_MEAN),
            "std": list(KINETICS_STD),
            "train_scale": [0.5, 1.0],
            "hflip": 0.5,
            "mirror_labels": {},  # class -> class a flipped clip shows; unlisted classes are mirror-symmetric
            "mirror_index": None,  # filled on load: label index -> label index of the flipped clip
            "colour": "rgb",  # or "contrast"
            "ucf_fold": 1,
        }

    def demo_config(self) -> dict:
        """Moving-shape demo: 8 frames of 32 px (mosaic 2 x 4 -> 3 x 64 x 128), flips that mirror the
        direction label, colours replaced by contrast to the background (the demo's colours are random)."""
        return self.config(num_frames=8, frame_size=32, hflip=0.5, mirror_labels=demo_mirror_labels(),
                           colour="contrast", train_scale=[0.7, 1.0])

    def validate_config(self, cfg):
        if int(cfg["num_frames"]) < 1 or int(cfg["frame_size"]) < 4:
            raise ValueError(f"video: need num_frames >= 1 and frame_size >= 4, got {cfg['num_frames']}, {cfg['frame_size']}")
        if cfg["layout"] not in ("mosaic", "channels"):
            raise ValueError(f"video: layout must be 'mosaic' or 'channels', got {cfg['layout']!r}")
        if cfg["colour"] not in ("rgb", "contrast"):
            raise ValueError(f"video: colour must be 'rgb' or 'contrast', got {cfg['colour']!r}")
        mirror = cfg["mirror_labels"]
        if not isinstance(mirror, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mirror.items()):
            raise ValueError(f"video: mirror_labels must map class names to class names, got {mirror!r}")
        broken = sorted(k for k, v in mirror.items() if mirror.get(v, v) != k)
        if broken:
            raise ValueError(f"video: mirror_labels must pair classes both ways (a -> b and b -> a); {broken} do not")

    def fit_config(self, raw, cfg):
        """``mirror_index`` from ``mirror_labels`` and the class names; unknown names raise ``ValueError``."""
        names = list(raw["train"].features["label"].names)
        unknown = sorted(set(cfg["mirror_labels"]) - set(names))
        if unknown:
            raise ValueError(f"video: mirror_labels names class(es) {unknown} that the data does not have: {names}")
        mirror = cfg["mirror_labels"]
        return {**cfg, "mirror_index": [names.index(mirror.get(n, n)) for n in names]}

    def in_chans(self, cfg=None) -> int:
        cfg = self.config(cfg)
        return 3 if cfg["layout"] == "mosaic" else 3 * cfg["num_frames"]

    def input_size(self, cfg=None) -> tuple[int, int]:
        cfg = self.config(cfg)
        s = cfg["frame_size"]
        if cfg["layout"] == "channels":
            return (s, s)
        gh, gw = grid_shape(cfg["num_frames"])
        return (gh * s, gw * s)

    def raw_features(self, label_names, cfg):
        import datasets

        return datasets.Features(
            {
                "video": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                "frames": datasets.Sequence(datasets.Image(decode=False)),
                "label": datasets.ClassLabel(names=list(label_names)),
            }
        )

    # ----------------------------------------------------------------- adapter
    def frames_tensor(self, frames: np.ndarray, cfg: dict, train: bool, flip: bool = False) -> torch.Tensor:
        """``T x H x W x 3`` uint8 -> normalised ``T x 3 x s x s`` (one crop for all frames; ``flip`` mirrors them)."""
        from torchvision.transforms import v2

        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        s = int(cfg["frame_size"])
        if train:
            tf = v2.RandomResizedCrop(s, scale=tuple(cfg["train_scale"]), antialias=True)
        else:
            tf = v2.Compose([v2.Resize(s, antialias=True), v2.CenterCrop(s)])
        x = tf(x).float() / 255.0  # v2 draws one set of parameters for the whole T x C x H x W tensor
        if flip:
            x = x.flip(-1)
        std = torch.tensor(cfg["std"])[None, :, None, None]
        if cfg["colour"] == "contrast":
            background = rearrange(x, "t c h w -> c (t h w)").median(dim=1).values
            return (x - background[None, :, None, None]).abs() / std
        mean = torch.tensor(cfg["mean"])[None, :, None, None]
        return (x - mean) / std

    def example(self, raw, cfg, train):
        """Inputs and label; a training flip (probability ``hflip``) maps the label through ``mirror_index``."""
        label = int(raw["label"])
        flip = train and float(torch.rand(())) < cfg["hflip"]  # always drawn: later draws do not depend on hflip
        if flip:
            if cfg["mirror_index"] is None:
                if cfg["mirror_labels"]:
                    raise ValueError("video: mirror_labels are set but mirror_index is not; load data with "
                                     "uniperc.modalities.video.load (it fits mirror_index from the class names)")
            else:
                label = cfg["mirror_index"][label]
        return self._input(raw, cfg, train, flip), torch.tensor(label, dtype=torch.long)

    def to_input(self, raw, cfg, train):
        """The adapter input; never flipped here, since only :meth:`example` can mirror the label too."""
        return self._input(raw, cfg, train, flip=False)

    def _input(self, raw, cfg, train, flip):
        value = raw["video"]
        if raw.get("frames"):
            value = {"frames": raw["frames"]}
        path = raw["video"].get("path") if isinstance(raw.get("video"), dict) else None
        frames = decode_frames(value, int(cfg["num_frames"]), train, f"video sample {path or ''}".strip())
        x = self.frames_tensor(frames, cfg, train, flip)
        if cfg["layout"] == "mosaic":
            return mosaic(x).contiguous()
        return rearrange(x, "t c h w -> (t c) h w").contiguous()

    def raw_from_file(self, path, cfg):
        return {"video": {"bytes": None, "path": str(path)}, "frames": []}

    def input_field_for(self, feature):
        """A list of images is a clip's frames; anything else an encoded video."""
        import datasets

        frames = isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image)
        return "frames" if frames else "video"

    # ----------------------------------------------------------------- sources
    def load_folder(self, path, cfg, seed=0, val_fraction=0.1):
        """Kinetics layout if ``root/train`` exists, else UCF101 layout (see the module docstring)."""
        path = Path(path)
        if (path / "train").is_dir():
            items, labels = _kinetics_items(path, val_fraction, seed)
        else:
            items, labels = _ucf_items(path, int(cfg["ucf_fold"]), val_fraction, seed)
        return self._rows(items, labels, cfg, str(path))

    def _rows(self, items, labels, cfg, where):
        import datasets

        feats = self.raw_features(labels, cfg)
        out = {}
        for split in ("train", "validation", "test"):
            rows = [(f, y) for f, y, s in items if s == split]
            if not rows:
                raise ValueError(f"video: folder {where!r} gives an empty {split} split")
            out[split] = datasets.Dataset.from_dict(
                {"video": [{"bytes": None, "path": str(f)} for f, _ in rows], "frames": [[] for _ in rows],
                 "label": [y for _, y in rows]},
                features=feats,
            )
        return datasets.DatasetDict(out)

    def load_hub(self, cfg, cache_dir=None, **kw):
        """UCF101 frame table -> one row per clip with its ordered frames."""
        import datasets

        spec = self.hub_spec(cfg)
        out = {}
        for split, hub_split in spec.splits.items():
            ds = datasets.load_dataset(spec.name, spec.config, split=hub_split, cache_dir=cache_dir, **kw)
            out[split] = self.from_hub(ds, spec, cfg)
        groups = out["train"]["video_id"]
        assign = split_by_key(groups, (0.1, 0.0), 0)
        out["validation"] = out["train"].select([i for i, s in enumerate(assign) if s == "validation"])
        out["train"] = out["train"].select([i for i, s in enumerate(assign) if s == "train"])
        return datasets.DatasetDict({k: out[k].remove_columns("video_id") for k in ("train", "validation", "test")})

    def from_hub(self, ds, spec, cfg):
        import datasets

        missing = [c for c in ("image", "clip_id", "frame", "label", "video_id") if c not in ds.column_names]
        if missing:
            raise ValueError(f"video: Hub dataset {spec.name} lacks column(s) {missing}; it has {ds.column_names}")
        ds = ds.cast_column("image", datasets.Image(decode=False))
        meta = ds.select_columns(["clip_id", "frame", "video_id", "label"]).to_pandas()
        order = meta.sort_values(["clip_id", "frame"]).groupby("clip_id", sort=True)
        names = ds.features["label"].names
        feats = self.raw_features(names, cfg)
        feats["video_id"] = datasets.Value("string")

        def gen():
            for _, g in order:
                idx = g.index.tolist()
                yield {"video": {"bytes": None, "path": None}, "frames": ds[idx]["image"],
                       "label": int(g["label"].iloc[0]), "video_id": str(g["video_id"].iloc[0])}

        return datasets.Dataset.from_generator(gen, features=feats)

    def make_demo(self, root, seed: int = 0, n_per_class: int = 30, size: int = 48, min_frames: int = 6,
                  max_frames: int = 20, test_fraction: float = 0.2, val_fraction: float = 0.1):
        """Moving shapes (3 shapes x 4 directions = 12 classes) as H.264 ``.mp4``, Kinetics layout.

        Clip length is random in ``[min_frames, max_frames]`` (some shorter than ``num_frames``, which
        exercises the short-clip rule); random colours, size, speed, start and background noise.
        """
        import av

        root = Path(root)
        rng = np.random.default_rng(seed)
        n_test = max(1, round(n_per_class * test_fraction))
        n_val = max(1, round(n_per_class * val_fraction))
        for shape in DEMO_SHAPES:
            for direction, (dx, dy) in DEMO_DIRECTIONS.items():
                label = f"{shape}_{direction}"
                for i in range(n_per_class):
                    split = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
                    frames = _moving_shape(shape, dx, dy, size, int(rng.integers(min_frames, max_frames + 1)), rng)
                    out = root / split / label / f"{label}_{i:04d}.mp4"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with av.open(str(out), mode="w") as container:
                        stream = container.add_stream("libx264", rate=12)
                        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
                        stream.options = {"crf": "18", "preset": "ultrafast"}
                        for f in frames:
                            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                                container.mux(packet)
                        for packet in stream.encode():
                            container.mux(packet)
        return root


def demo_mirror_labels() -> dict[str, str]:
    """Demo class -> the class its mirror image shows: left and right swap, up and down stay."""
    out = {}
    for shape in DEMO_SHAPES:
        for direction, (dx, dy) in DEMO_DIRECTIONS.items():
            mirrored = next(d for d, v in DEMO_DIRECTIONS.items() if v == (-dx, dy))
            if mirrored != direction:
                out[f"{shape}_{direction}"] = f"{shape}_{mirrored}"
    return out


def _kinetics_items(path: Path, val_fraction: float, seed: int):
    split_dirs = {"train": "train", "validation": None, "test": None}
    for name in ("validation", "val", "valid"):
        if (path / name).is_dir():
            split_dirs["validation"] = name
            break
    for name in ("test", "testing"):
        if (path / name).is_dir():
            split_dirs["test"] = name
            break
    labels = sorted({d.name for s in split_dirs.values() if s for d in (path / s).iterdir() if d.is_dir()})
    items = []
    for split, d in split_dirs.items():
        if d is None:
            continue
        for y, label in enumerate(labels):
            folder = path / d / label
            if folder.is_dir():
                items += [(f, y, split) for f in sorted(folder.iterdir()) if f.suffix.lower() in VIDEO_EXTENSIONS]
    missing = [s for s, d in split_dirs.items() if d is None]
    if missing:  # carve validation (and test) from train by a stable hash of the file stem
        fr = (val_fraction if "validation" in missing else 0.0, val_fraction if "test" in missing else 0.0)
        train = [(f, y) for f, y, s in items if s == "train"]
        assign = split_by_key([f.stem for f, _ in train], fr, seed)
        items = [it for it in items if it[2] != "train"] + [(f, y, s) for (f, y), s in zip(train, assign)]
    return items, labels


def _ucf_items(path: Path, fold: int, val_fraction: float, seed: int):
    labels = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.lower().startswith("ucftraintest"))
    if not labels:
        raise ValueError(f"video: folder {str(path)!r} has neither train/ (Kinetics) nor class folders (UCF101)")
    lists = path / "ucfTrainTestlist"
    test_list = lists / f"testlist0{fold}.txt"
    listed_test = None
    if test_list.exists():
        listed_test = {line.split()[0].strip() for line in test_list.read_text().splitlines() if line.strip()}
    items = []
    for y, label in enumerate(labels):
        for f in sorted((path / label).iterdir()):
            if f.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            m = _UCF_NAME.match(f.stem)
            group = int(m["group"]) if m else None
            if listed_test is not None:
                test = f"{label}/{f.name}" in listed_test
            elif group is not None:
                test = group <= 7  # UCF101 split 1: groups 1-7 are the test set
            else:
                test = split_by_key([f.stem], (0.0, 0.2), seed)[0] == "test"
            # validation: whole groups of the training part (clips of one group share actor/background)
            key = f"{label}_g{group}" if group is not None else f.stem
            split = "test" if test else split_by_key([key], (val_fraction, 0.0), seed)[0]
            items.append((f, y, split))
    return items, labels


def _moving_shape(shape: str, dx: int, dy: int, size: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` RGB frames of one shape moving in direction (dx, dy) over a noisy background."""
    r = int(rng.integers(size // 10, size // 5))
    speed = rng.uniform(1.0, 2.0) * (size - 2 * r - 2) / max(n, 1) / 1.5
    travel = speed * (n - 1)
    lo, hi = r + 1, size - r - 1
    start = np.array([rng.uniform(lo, hi), rng.uniform(lo, hi)])
    for axis, d in enumerate((dx, dy)):  # start far enough back that the path stays inside the frame
        if d > 0:
            start[axis] = rng.uniform(lo, max(lo, hi - travel))
        elif d < 0:
            start[axis] = rng.uniform(min(hi, lo + travel), hi)
    bg = rng.uniform(0, 255, 3)
    fg = (bg + rng.uniform(90, 165, 3)) % 256
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for k in range(n):
        cx, cy = start + k * speed * np.array([dx, dy])
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        elif shape == "square":
            mask = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
        else:  # upward triangle
            mask = (yy <= cy + r * 0.8) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
        img = np.broadcast_to(bg, (size, size, 3)) + rng.normal(0, 8, (size, size, 3))
        img[mask] = fg
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


MODALITY = VideoModality()
