"""Image modality: an RGB image -> ``3 x image_size x image_size`` (C' = 3), as UniRepLKNet on ImageNet.

Adapter: timm's standard transforms (``timm.data.create_transform``): train = RandomResizedCrop
(``train_scale``) + horizontal flip (``hflip``) + colour jitter, eval = resize to ``image_size/crop_pct``
+ centre crop; then normalisation by ``mean``/``std``. Grey-scale or RGBA images are converted to RGB.

Sources: ``demo`` = scikit-learn's 8x8 handwritten digits (1797 real samples, 10 classes) written as
28x28 PNGs in the imagefolder layout; ``folder`` = the imagefolder layout read by ``datasets``'
``imagefolder`` builder (``root/{train,validation,test}/<class>/*.png``, or ``root/<class>/*`` which is then
split by a stable hash of the file name); ``hub`` = ImageNet-1k (``ILSVRC/imagenet-1k``).
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import HubSpec, Modality, split_by_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@lru_cache(maxsize=16)
def _timm_transform(cfg_json: str, train: bool):
    """timm's standard train/eval pipeline for a config (cached: building it per sample is wasteful)."""
    from timm.data import create_transform

    cfg = json.loads(cfg_json)
    size = cfg["image_size"]
    return create_transform(
        input_size=(3, size, size),
        is_training=train,
        scale=tuple(cfg["train_scale"]),
        hflip=cfg["hflip"],
        color_jitter=cfg["color_jitter"],
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_pct=cfg["crop_pct"],
    )


def to_pil(value, what: str = "image"):
    """A decoded ``PIL.Image``, ``{"bytes", "path"}`` dict, path or HxW(xC) array -> RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            src = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
            what = f"{what} {value.get('path') or ''}".strip()
            if src is None:
                raise ValueError(f"{what}: image dict has neither bytes nor path")
            img = Image.open(src)
        elif isinstance(value, (str, Path)):
            img = Image.open(value)
        else:
            arr = np.asarray(value)
            if arr.dtype != np.uint8:
                arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: cannot decode image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{what}: empty image")
    return img.convert("RGB")


class ImageModality(Modality):
    name = "image"
    task = "classification"
    file_extensions = IMAGE_EXTENSIONS
    input_field = "image"  # a user's dataset: an Image column (or {"bytes", "path"} structs / paths)
    input_media = "Image"  # or a column of file paths / bytes
    hub = HubSpec(
        name="ILSVRC/imagenet-1k",
        config=None,
        columns={"image": "image", "label": "label"},
        # ImageNet's labelled evaluation set is its "validation" split (the Hub "test" split is unlabelled).
        splits={"train": "train[:99%]", "validation": "train[99%:]", "test": "validation"},
        num_classes=1000,
        notes="gated dataset: accept the licence on the Hub and log in first",
    )

    def default_config(self) -> dict:
        return {
            "image_size": 224,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "train_scale": [0.08, 1.0],
            "hflip": 0.5,
            "color_jitter": 0.4,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "val_fraction": 0.1,  # folder without validation/ (or test/) subfolder: hashed hold-out
            "test_fraction": 0.2,
        }

    def demo_config(self) -> dict:
        """Settings that suit the 8x8 digits: small input, no flip (a flipped digit is another glyph)."""
        return self.config(image_size=32, hflip=0.0, train_scale=[0.6, 1.0], color_jitter=0.0, crop_pct=1.0)

    def validate_config(self, cfg: dict) -> None:
        if int(cfg["image_size"]) < 8:
            raise ValueError(f"image: image_size must be >= 8, got {cfg['image_size']}")
        if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3:
            raise ValueError("image: mean and std need 3 values (RGB)")

    def in_chans(self, cfg=None) -> int:
        return 3

    def input_size(self, cfg=None) -> tuple[int, int]:
        size = self.config(cfg)["image_size"]
        return (size, size)

    def raw_features(self, label_names, cfg):
        import datasets

        # decode=False: the bytes reach to_pil, so an undecodable image is a ValueError naming its file
        return datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=label_names)})

    # ----------------------------------------------------------------- adapter
    def to_input(self, raw, cfg, train):
        img = to_pil(raw["image"], what="image sample")
        return _timm_transform(json.dumps(cfg, sort_keys=True), bool(train))(img)

    def raw_from_file(self, path, cfg):
        return {"image": to_pil(path, what=f"image file {str(path)!r}")}

    # ----------------------------------------------------------------- sources
    def load_folder(self, path, cfg, seed=0, **kw):
        """imagefolder layout through ``datasets``' own ``imagefolder`` builder."""
        import datasets

        dsd = datasets.load_dataset("imagefolder", data_dir=str(path), **kw)
        splits = {_canonical_split(k): v for k, v in dsd.items()}
        if "train" not in splits:
            raise ValueError(f"image: folder {str(path)!r} has no train split / class subfolders")
        if "validation" not in splits or "test" not in splits:
            splits = _hold_out(splits, cfg, seed)
        names = splits["train"].features["label"].names
        feats = self.raw_features(names, cfg)
        return datasets.DatasetDict({k: splits[k].cast(feats) for k in ("train", "validation", "test")})

    def make_demo(self, root, seed: int = 0, n_per_class: int | None = None, side: int = 28):
        """scikit-learn's digits (real handwriting, 8x8, 16 grey levels) upsampled to ``side`` px PNGs.

        Split by a stable hash of the sample index: ~70% train, 10% validation, 20% test.
        ``n_per_class`` caps the samples per digit (tiny sets for tests).
        """
        from PIL import Image
        from sklearn.datasets import load_digits

        root = Path(root)
        digits = load_digits()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(digits.target))
        counts: dict[int, int] = {}
        keep = []
        for i in order:
            y = int(digits.target[i])
            if n_per_class is None or counts.get(y, 0) < n_per_class:
                counts[y] = counts.get(y, 0) + 1
                keep.append(int(i))
        splits = split_by_key([str(i) for i in keep], (0.1, 0.2), seed)
        if n_per_class is not None:  # tiny sets: guarantee every split holds every class
            splits = _round_robin_splits([int(digits.target[i]) for i in keep])
        for i, split in zip(keep, splits):
            y = int(digits.target[i])
            pixels = (digits.images[i] / 16.0 * 255.0).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((side, side), Image.BICUBIC)
            out = root / split / str(y) / f"digit_{i:04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out)
        return root


def _round_robin_splits(labels: list[int]) -> list[str]:
    """Per class: 1st sample -> validation, 2nd -> test, the rest alternate train/train/val/test."""
    cycle = ("validation", "test", "train", "train", "train")
    seen: dict[int, int] = {}
    out = []
    for y in labels:
        k = seen.get(y, 0)
        seen[y] = k + 1
        out.append(cycle[k % len(cycle)])
    return out


def _canonical_split(name: str) -> str:
    return {"val": "validation", "valid": "validation", "dev": "validation"}.get(name, name)


def _hold_out(splits: dict, cfg: dict, seed: int) -> dict:
    """Carve the missing validation/test splits out of train by a stable hash of the row index."""
    train = splits["train"]
    val_frac = cfg["val_fraction"] if "validation" not in splits else 0.0
    test_frac = cfg["test_fraction"] if "test" not in splits else 0.0
    assign = split_by_key([str(i) for i in range(len(train))], (val_frac, test_frac), seed)
    out = dict(splits)
    for split in ("train", "validation", "test"):
        if split == "train" or split not in splits:
            out[split] = train.select([i for i, s in enumerate(assign) if s == split])
    return out


MODALITY = ImageModality()
