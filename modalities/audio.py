"""Audio modality: waveform -> log-mel filterbank image ``1 x n_mels x target_frames`` (C' = 1).

Adapter (UniRepLKNet follows AST here): decode (soundfile; librosa for other formats) -> mono ->
resample to ``sample_rate`` (torchaudio; any input rate is accepted) -> Kaldi-compatible log-mel
filterbank (``torchaudio.compliance.kaldi.fbank``: ``n_mels`` bins, 25 ms Hann window, 10 ms hop) ->
normalisation -> pad/crop to ``target_frames`` -> SpecAugment in training
(``torchaudio.transforms.FrequencyMasking``/``TimeMasking``).

Reading of the details (documented because the paper leaves them open):

* normalisation ``"instance"`` (default) standardises each clip over its own frames, which needs no
  dataset statistics; ``"fixed"`` uses AST's ``(x - norm_mean) / (2 * norm_std)`` with AST's Speech
  Commands statistics by default.
* pad/crop: a longer clip is cropped at random in training and centrally otherwise; a shorter one is
  placed at a random offset in training and centred otherwise; the padding value is the clip's lowest
  normalised energy (its silence floor), so padding looks like silence rather than like a loud frame.
* ``n_mels`` = 128 follows the paper; ``target_frames`` = 128 follows AST's Speech Commands recipe
  (1 s clips give 98 frames). The spoken-digit demo uses :meth:`AudioModality.demo_config`
  (128 mels x 80 frames, i.e. 0.8 s at the 10 ms hop) because the synthesised digits are shorter than 0.8 s
  and fewer frames make CPU training faster.

Sources: ``demo`` = spoken digits synthesised with espeak-ng over many voices, speeds, pitches plus
noise, the test split using voices that never occur in training, plus (``festival_per_class`` > 0) a
``test_festival`` split spoken by Debian's festival synthesiser, which never occurs in training: a test of
robustness to a synthesiser never heard rather than a voice never heard; ``folder`` = the Speech Commands
layout (``root/<label>/<speaker>_nohash_<n>.wav`` with optional ``validation_list.txt`` /
``testing_list.txt``, and any ``test_<name>_list.txt`` as an extra evaluation split ``test_<name>``); ``hub`` = Speech Commands v0.02 (``google/speech_commands``, 35 words).
Raw rows store ``{"audio": {"bytes", "path"}}`` and are decoded in the transform, so neither torchcodec
nor FFmpeg is needed.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .base import HubSpec, Modality, check_finite, split_by_key

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
SNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")  # read by libsndfile; others via librosa
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voice = language/accent + voice variant (timbre). Held-out *variants* make unseen voices.
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie", "Gene", "Lee", "Mario", "Michael",
    "aunty", "belinda", "boris", "david", "edward", "grandpa", "iven", "john", "linda",
    "max", "paul", "quincy", "rob", "robert", "steph", "adam", "norbert",
)  # left out: "zac" (formants x1.45, a child-like outlier no other voice prepares for) and "travis" (x0.5)
# festival voices Debian ships for English -> the package that ships each (none are in training data)
FESTIVAL_VOICES = {
    "kal_diphone": "festvox-kallpc16k",  # US male diphone (installed with the festival package)
    "ked_diphone": "festvox-kdlpc16k",  # US male diphone
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",  # US female, HMM-based (HTS), 32 kHz
}
# CMU flite voices for *training* (flite_per_class > 0): statistical-parametric (clustergen) speech, a second
# kind of synthesis next to espeak's formants. flite comes from festival's authors, so none of festival's test
# speakers may be used: kal / kal16 are the kal diphone speaker of kal_diphone, slt is the ARCTIC speaker of
# cmu_us_slt_arctic_hts; awb_time is a limited-domain talking clock (its "zero" lasts 0.14 s). The value says
# whether the voice follows ``int_f0_target_mean`` (rms ignores it: its output is bit-identical).
FLITE_VOICES = {"awb": True, "rms": False}  # awb: Scottish-English male; rms: US male
# MBROLA diphone voices for *training* (mbrola_per_class > 0), spoken through espeak-ng's front end: recorded
# diphones concatenated by the MBROLA engine, the kind of synthesis festival's kal / ked voices are, from other
# speakers and another engine. Voice -> Debian package (contrib/non-free: MBROLA's licence is non-commercial).
MBROLA_VOICES = {
    "us1": "mbrola-us1",  # US female
    "us2": "mbrola-us2",  # US male
    "us3": "mbrola-us3",  # US male
    "en1": "mbrola-en1",  # British male
}
# SVOX Pico voices for *training* (pico_per_class > 0): HMM-based statistical-parametric speech, the kind
# festival's slt voice is, from another engine and other (female) speakers. Debian non-free libttspico-utils.
PICO_VOICES = ("en-US", "en-GB")
SPEECH_COMMANDS_V2_LABELS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
    "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
    "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)
# AST's Speech Commands fbank statistics (used by norm="fixed").
AST_SPEECHCOMMANDS_MEAN, AST_SPEECHCOMMANDS_STD = -6.845978, 5.5654526


@lru_cache(maxsize=8)
def _resampler(orig: int, new: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def decode_audio(value, what: str) -> tuple[np.ndarray, int]:
    """``{"bytes", "path"}`` dict, path or ``{"array", "sampling_rate"}`` -> (mono float32 wave, rate).

    Corrupt, empty or non-finite audio raises ``ValueError`` naming ``what``.
    """
    import soundfile as sf

    if isinstance(value, dict) and value.get("array") is not None:
        wave, sr = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    else:
        if isinstance(value, dict):
            src = value.get("bytes") or value.get("path")
            what = f"{what} {value.get('path') or ''}".strip()
        else:
            src = value
        if src is None:
            raise ValueError(f"{what}: audio has neither bytes nor path")
        try:
            wave, sr = sf.read(io.BytesIO(src) if isinstance(src, bytes) else src, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            if isinstance(src, bytes) or str(src).lower().endswith(SNDFILE_EXTENSIONS):
                raise ValueError(f"{what}: cannot decode audio ({e})") from None
            wave, sr = _librosa_load(src, what, e)
        wave = wave.mean(axis=1) if wave.ndim == 2 else wave
    if wave.size == 0:
        raise ValueError(f"{what}: empty audio (0 samples)")
    if not np.isfinite(wave).all():
        raise ValueError(f"{what}: audio contains non-finite samples (NaN or inf)")
    return np.ascontiguousarray(wave, dtype=np.float32), sr


def _librosa_load(path, what, first_error):
    """Formats libsndfile cannot read (e.g. some MP3s) through librosa/audioread."""
    import librosa

    try:
        wave, sr = librosa.load(path, sr=None, mono=True)
    except Exception as e:  # librosa raises many types; all mean "not decodable"
        raise ValueError(f"{what}: cannot decode audio ({first_error}; librosa: {e})") from None
    return wave, sr


class AudioModality(Modality):
    name = "audio"
    task = "classification"
    demo_version = 4  # bumped when the generator changes, so cached demo sets are rebuilt (4: float64 resampling)
    file_extensions = AUDIO_EXTENSIONS
    input_field = "audio"  # a user's dataset: an Audio column (or {"bytes", "path"} structs)
    input_media = "Audio"  # or a column of file paths / bytes
    optional_fields = ("speaker",)
    hub = HubSpec(
        name="google/speech_commands",
        config="v0.02",
        columns={"audio": "audio", "label": "label", "speaker_id": "speaker"},
        splits={"train": "train", "validation": "validation", "test": "test"},
        num_classes=35,
        decode_off=("audio",),
        notes="the Hub label set adds '_silence_' (background-noise chunks); those rows are dropped "
        "to give the 35-word task",
        extra={"labels": SPEECH_COMMANDS_V2_LABELS, "drop_label": "_silence_"},
    )

    def default_config(self) -> dict:
        return {
            "sample_rate": 16000,
            "n_mels": 128,
            "frame_shift_ms": 10.0,
            "frame_length_ms": 25.0,
            "target_frames": 128,
            "norm": "instance",  # or "fixed" (AST statistics below)
            "norm_mean": AST_SPEECHCOMMANDS_MEAN,
            "norm_std": AST_SPEECHCOMMANDS_STD,
            "freq_mask": 48,  # SpecAugment widths (AST's Speech Commands recipe); 0 disables
            "time_mask": 48,
            "time_shift": True,  # random placement / crop in training
            # voice / channel augmentation in training (0 disables each): robustness to unseen speakers
            # and synthesisers, whose formant scale, spectral colour and speaking rate differ
            "vtln_warp": 0.0,  # VTLP: Kaldi's VTLN frequency warp, factor uniform in 1 +- this
            "eq_db": 0.0,  # one random peaking-EQ band (200-4000 Hz, Q 0.5-2) of gain uniform in +- this dB
            "tempo": 0.0,  # speaking rate: the frames resampled in time by a factor uniform in 1 +- this
        }

    def demo_config(self) -> dict:
        """Spoken-digit demo: 128 mels x 80 frames (0.8 s), SpecAugment scaled to the shorter input."""
        return self.config(target_frames=80, freq_mask=24, time_mask=16)

    def validate_config(self, cfg):
        for key in ("sample_rate", "n_mels", "target_frames"):
            if int(cfg[key]) <= 0:
                raise ValueError(f"audio: {key} must be positive, got {cfg[key]}")
        for key, high in (("vtln_warp", 0.5), ("eq_db", 40.0), ("tempo", 0.5)):
            if not 0 <= float(cfg[key]) < high:
                raise ValueError(f"audio: {key} must be in [0, {high}), got {cfg[key]}")
        if cfg["norm"] not in ("instance", "fixed"):
            raise ValueError(f"audio: norm must be 'instance' or 'fixed', got {cfg['norm']!r}")

    def in_chans(self, cfg=None) -> int:
        return 1

    def input_size(self, cfg=None) -> tuple[int, int]:
        cfg = self.config(cfg)
        return (cfg["n_mels"], cfg["target_frames"])

    def raw_features(self, label_names, cfg):
        import datasets

        return datasets.Features(
            {
                "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                "label": datasets.ClassLabel(names=list(label_names)),
                "speaker": datasets.Value("string"),
            }
        )

    # ----------------------------------------------------------------- adapter
    def fbank(self, wave: np.ndarray, sr: int, cfg: dict, what: str = "audio", train: bool = False) -> torch.Tensor:
        """Mono wave at any rate -> normalised log-mel ``n_mels x frames`` (frames = clip length).

        ``train`` applies the voice / channel augmentation of ``vtln_warp``, ``eq_db`` and ``tempo``.
        """
        import torchaudio

        x = torch.from_numpy(wave)[None]
        if sr != cfg["sample_rate"]:
            x = _resampler(int(sr), int(cfg["sample_rate"]))(x)
        warp = 1.0
        if train and cfg["eq_db"]:
            x = torchaudio.functional.equalizer_biquad(
                x, int(cfg["sample_rate"]), center_freq=float(200 * 20 ** torch.rand(()).item()),
                gain=float((2 * torch.rand(()) - 1) * cfg["eq_db"]), Q=float(0.5 + 1.5 * torch.rand(())))
        if train and cfg["vtln_warp"]:
            warp = float(1 + (2 * torch.rand(()) - 1) * cfg["vtln_warp"])
        min_len = int(round(cfg["sample_rate"] * cfg["frame_length_ms"] / 1000))
        if x.shape[1] < min_len:  # shorter than one analysis window: pad to one frame
            x = torch.nn.functional.pad(x, (0, min_len - x.shape[1]))
        fb = torchaudio.compliance.kaldi.fbank(
            x - x.mean(),
            htk_compat=True,
            sample_frequency=float(cfg["sample_rate"]),
            use_energy=False,
            window_type="hanning",
            num_mel_bins=int(cfg["n_mels"]),
            dither=0.0,
            frame_shift=float(cfg["frame_shift_ms"]),
            frame_length=float(cfg["frame_length_ms"]),
            vtln_warp=warp,
        ).T  # (n_mels, frames)
        if train and cfg["tempo"]:
            rate = float(1 + (2 * torch.rand(()) - 1) * cfg["tempo"])
            frames = max(1, round(fb.shape[1] / rate))
            fb = torch.nn.functional.interpolate(fb[None], size=frames, mode="linear", align_corners=True)[0]
        if cfg["norm"] == "instance":
            fb = (fb - fb.mean()) / fb.std().clamp_min(1e-5)
        else:
            fb = (fb - cfg["norm_mean"]) / (2 * cfg["norm_std"])
        return check_finite(fb, what)

    def to_input(self, raw, cfg, train):
        what = f"audio sample (speaker {raw.get('speaker')})" if raw.get("speaker") else "audio sample"
        wave, sr = decode_audio(raw["audio"], what)
        fb = self.fbank(wave, sr, cfg, what, train=train)
        fb = _fit_frames(fb, int(cfg["target_frames"]), random=train and cfg["time_shift"])
        if train:
            from torchaudio.transforms import FrequencyMasking, TimeMasking

            if cfg["freq_mask"]:
                fb = FrequencyMasking(int(cfg["freq_mask"]))(fb)
            if cfg["time_mask"]:
                fb = TimeMasking(int(cfg["time_mask"]))(fb)
        return fb[None].contiguous()

    def raw_from_file(self, path, cfg):
        return {"audio": {"bytes": None, "path": str(path)}, "speaker": None}

    # ----------------------------------------------------------------- sources
    def load_folder(self, path, cfg, seed=0, val_fraction=0.1, test_fraction=0.1):
        """Speech Commands layout: ``root/<label>/*.wav``; folders starting with ``_`` are skipped.

        Split: ``validation_list.txt`` / ``testing_list.txt`` (paths relative to root) when present,
        else a stable hash of the speaker id (file-name part before ``_nohash_``), as Speech Commands does.
        Each ``test_<name>_list.txt`` makes an extra evaluation split ``test_<name>`` of the files it lists
        (e.g. the demo's ``test_festival``), which are then in no other split.
        """
        import datasets

        path = Path(path)
        labels = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        if not labels:
            raise ValueError(f"audio: folder {str(path)!r} has no label subfolders")
        files, ys, speakers = [], [], []
        for y, label in enumerate(labels):
            for f in sorted((path / label).iterdir()):
                if f.suffix.lower() in AUDIO_EXTENSIONS:
                    files.append(f)
                    ys.append(y)
                    speakers.append(f.name.split("_nohash_")[0] if "_nohash_" in f.name else f.stem)
        rel = [f.relative_to(path).as_posix() for f in files]
        extra = {f.name[: -len("_list.txt")]: f for f in sorted(path.glob("test_*_list.txt"))}
        extra_of = {line: s for s, f in extra.items() for line in f.read_text().split()}
        lists = {s: path / n for s, n in (("validation", "validation_list.txt"), ("test", "testing_list.txt"))}
        if all(p.exists() for p in lists.values()):
            listed = {line: s for s, p in lists.items() for line in p.read_text().split()}
            splits = [listed.get(r, "train") for r in rel]
        else:
            splits = split_by_key(speakers, (val_fraction, test_fraction), seed)
        # a file on an extra list belongs to that split only: never to train (it is why the list exists)
        splits = [extra_of.get(r, s) for r, s in zip(rel, splits)]
        feats = self.raw_features(labels, cfg)
        out = {}
        for split in ("train", "validation", "test", *extra):
            idx = [i for i, s in enumerate(splits) if s == split]
            out[split] = datasets.Dataset.from_dict(
                {
                    "audio": [{"bytes": None, "path": str(files[i])} for i in idx],
                    "label": [ys[i] for i in idx],
                    "speaker": [speakers[i] for i in idx],
                },
                features=feats,
            )
        return datasets.DatasetDict(out)

    def from_hub(self, ds, spec, cfg):
        """Drop the ``_silence_`` rows and keep the 35 word classes (their ids are unchanged)."""
        names = ds.features["label"].names
        drop = spec.extra["drop_label"]
        if drop in names:
            drop_id = names.index(drop)
            ds = ds.filter(lambda y: y != drop_id, input_columns="label")
            mapping = {i: list(spec.extra["labels"]).index(n) for i, n in enumerate(names) if n != drop}
            ds = ds.map(lambda y: {"label": mapping[y]}, input_columns="label")
        return self.from_table(ds, spec, cfg, list(spec.extra["labels"]))

    def make_demo(
        self,
        root,
        seed: int = 0,
        n_per_class: int = 220,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        workers: int | None = None,
        festival_per_class: int = 0,
        flite_per_class: int = 0,
        flite_formant_scale: tuple[float, float] = (1.0, 1.0),
        mbrola_per_class: int = 0,
        mbrola_formant_scale: tuple[float, float] = (1.0, 1.0),
        pico_per_class: int = 0,
        pico_formant_scale: tuple[float, float] = (1.0, 1.0),
        held_out: tuple[str, ...] = (),
    ):
        """Spoken digits "zero".."nine" from espeak-ng: ``n_per_class`` clips per digit (default 2200 clips).

        Each espeak-ng call speaks all ten digits with one voice (accent + variant), speed (120-220 wpm)
        and pitch (15-85), separated by 800 ms SSML breaks, and is cut at those exact-zero gaps — one
        process start per ten clips keeps 2200 clips well under a minute. Each clip gets random leading /
        trailing silence, gain and white noise at 10-30 dB SNR, and is written as 16-bit WAV at espeak's
        22.05 kHz (the adapter resamples). The voice variants are split into disjoint train / validation /
        test pools, so test voices never occur in training; the split is written as Speech Commands'
        ``validation_list.txt`` / ``testing_list.txt``.

        ``festival_per_class`` > 0 adds that many clips per digit spoken by festival (:func:`_festival_clips`),
        listed in ``test_festival_list.txt``: the ``test_festival`` split, in no other split. It is 0 by
        default, so only a config that asks for it needs festival installed.

        ``flite_per_class``, ``mbrola_per_class``, ``pico_per_class`` > 0 add that many *training* sessions of
        the ten digits spoken by CMU flite, MBROLA and SVOX Pico (:data:`TRAINING_SYNTHESISERS`,
        :func:`_training_clips`): other kinds of synthesis to learn from. A ``val_fraction`` of each one's sessions
        goes to validation, the rest to train; the test split stays the held-out espeak voices and
        ``test_festival`` stays unheard. Each needs its program and voices. ``<name>_formant_scale``
        ``(low, high)``: each session's vocal-tract scale is drawn uniformly from it (1 = the voice as it is).

        ``held_out`` names training synthesisers (e.g. ``["pico"]``) whose sessions go, all of them, to an extra
        test split ``test_<name>`` instead (``test_<name>_list.txt``, in no other split): more synthesisers never
        heard in training than festival alone, at the cost of not learning from them.
        """
        import soundfile as sf

        if shutil.which("espeak-ng") is None:
            raise RuntimeError(
                "audio demo: the espeak-ng program is needed to synthesise the spoken-digit demo set but "
                "was not found on PATH; install it (Debian/Ubuntu: `apt-get install -y espeak-ng`, "
                "macOS: `brew install espeak-ng`) or use source='folder' with real recordings"
            )
        if n_per_class < 1:
            raise ValueError(f"audio demo: n_per_class must be >= 1, got {n_per_class}")
        if festival_per_class < 0:
            raise ValueError(f"audio demo: festival_per_class must be >= 0, got {festival_per_class}")
        extra = {"flite": (flite_per_class, flite_formant_scale), "mbrola": (mbrola_per_class, mbrola_formant_scale),
                 "pico": (pico_per_class, pico_formant_scale)}
        for name, (per_class, scale) in extra.items():
            if per_class < 0:
                raise ValueError(f"audio demo: {name}_per_class must be >= 0, got {per_class}")
            if len(scale) != 2 or not 0.5 <= scale[0] <= scale[1] <= 2:
                raise ValueError(f"audio demo: {name}_formant_scale must be [low, high] with 0.5 <= low <= high <= 2, "
                                 f"got {scale}")
        held_out = [held_out] if isinstance(held_out, str) else list(held_out)
        unknown = [n for n in held_out if not extra.get(n, (0,))[0]]
        if unknown:
            have = [n for n, (k, _) in extra.items() if k]
            raise ValueError(f"audio demo: held_out names {unknown}, but only a training synthesiser with sessions "
                             f"can be held out (now {have}; set <name>_per_class > 0)")
        if festival_per_class:
            _check_festival()  # before any espeak work, so a missing voice costs no time
        for name, (per_class, _) in extra.items():
            if per_class:
                TRAINING_SYNTHESISERS[name].check()
        root = Path(root)
        rng = np.random.default_rng(seed)
        variants = list(rng.permutation(VARIANTS))
        n_test = max(1, round(len(variants) * test_fraction))
        n_val = max(1, round(len(variants) * val_fraction))
        pools = {"test": variants[:n_test], "validation": variants[n_test : n_test + n_val],
                 "train": variants[n_test + n_val :]}
        # one espeak call per "session": 10 clips; sessions assigned to splits in proportion, every split >= 1
        n_sessions = n_per_class
        n_te = max(1, round(n_sessions * test_fraction))
        n_va = max(1, round(n_sessions * val_fraction))
        split_of = ["test"] * n_te + ["validation"] * n_va + ["train"] * max(1, n_sessions - n_te - n_va)
        sessions = []
        for k, split in enumerate(split_of):
            sessions.append(
                {
                    "k": k,
                    "split": split,
                    "accent": str(rng.choice(ACCENTS)),
                    "variant": str(rng.choice(pools[split])),
                    "speed": int(rng.integers(120, 221)),
                    "pitch": int(rng.integers(15, 86)),
                    "seed": int(rng.integers(2**31)),
                }
            )
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:  # the work is in espeak-ng processes: threads suffice
            results = list(pool.map(_synthesise_session, sessions))
        lists = {"validation": [], "test": []}  # split -> its files; train is every file in no list

        def save(digit, speaker, k, clip, sr, split=None):
            rel = f"{digit}/{speaker}_nohash_{k:05d}.wav"
            (root / digit).mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, clip, sr, subtype="PCM_16")
            if split is not None:
                lists.setdefault(split, []).append(rel)

        for s, (clips, sr) in zip(sessions, results):
            split = None if s["split"] == "train" else s["split"]
            for digit, clip in zip(DIGITS, clips):
                save(digit, f"{s['accent']}_{s['variant']}", s["k"], clip, sr, split)
        for name, (per_class, scale) in extra.items():
            n_val = round(per_class * val_fraction)
            for digit, speaker, k, clip, sr in _training_clips(name, per_class, seed, workers, scale):
                save(digit, speaker, k, clip, sr,
                     f"test_{name}" if name in held_out else "validation" if k < n_val else None)
            if per_class:
                pools[f"test_{name}" if name in held_out else name] = [
                    f"{name}-{v}" for v in TRAINING_SYNTHESISERS[name].voices]
        if festival_per_class:
            for digit, speaker, k, clip, sr in _festival_clips(festival_per_class, seed):
                save(digit, speaker, k, clip, sr, "test_festival")
            pools["test_festival"] = [f"festival-{v}" for v in FESTIVAL_VOICES]
        for split, files in lists.items():  # Speech Commands' names, and test_<name>_list.txt for the extra splits
            name = {"validation": "validation_list.txt", "test": "testing_list.txt"}.get(split, f"{split}_list.txt")
            (root / name).write_text("\n".join(files) + "\n")
        (root / "voices.json").write_text(json.dumps(pools, indent=1))
        return root


def _fit_frames(fb: torch.Tensor, target: int, random: bool) -> torch.Tensor:
    """Crop or pad ``n_mels x frames`` to ``target`` frames (see the module docstring for the rule)."""
    frames = fb.shape[1]
    if frames == target:
        return fb
    slack = abs(frames - target)
    offset = int(torch.randint(0, slack + 1, ()).item()) if random else slack // 2
    if frames > target:
        return fb[:, offset : offset + target]
    out = fb.new_full((fb.shape[0], target), float(fb.min()))
    out[:, offset : offset + frames] = fb
    return out


def _espeak(text: str, voice: str, speed: int, pitch: int, ssml: bool) -> tuple[np.ndarray, int]:
    import soundfile as sf

    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout"] + (["-m"] if ssml else [])
    out = subprocess.run(cmd + [text], capture_output=True, check=True).stdout
    wave, sr = sf.read(io.BytesIO(out), dtype="float32")
    return wave, sr


def _synthesise_session(s: dict) -> tuple[list[np.ndarray], int]:
    """Ten digit clips of one voice/speed/pitch, each with silence padding, gain and noise."""
    voice = f"{s['accent']}+{s['variant']}"
    text = "<speak>" + '<break time="800ms"/>'.join(DIGITS) + "</speak>"
    wave, sr = _espeak(text, voice, s["speed"], s["pitch"], ssml=True)
    words = _split_on_silence(wave, min_gap=int(0.4 * sr))
    if len(words) != len(DIGITS):  # an unusual voice put a long pause inside a word: one call per digit
        words = [_trim(_espeak(d, voice, s["speed"], s["pitch"], ssml=False)[0]) for d in DIGITS]
    return _postprocess(words, sr, np.random.default_rng(s["seed"])), sr


def _postprocess(words: list[np.ndarray], sr: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every demo clip, whichever synthesiser spoke it: random silence padding, gain and white noise."""
    clips = []
    for w in words:
        pad = rng.integers(int(0.02 * sr), int(0.15 * sr), size=2)
        clip = np.concatenate([np.zeros(pad[0], np.float32), w, np.zeros(pad[1], np.float32)])
        clip *= rng.uniform(0.3, 1.0) / max(np.abs(clip).max(), 1e-6)
        speech_rms = math.sqrt(float(np.mean(clip[pad[0] : pad[0] + len(w)] ** 2)))
        noise_rms = speech_rms / 10 ** (rng.uniform(10, 30) / 20)  # SNR 10-30 dB
        clip = clip + rng.normal(0, noise_rms, clip.shape).astype(np.float32)
        clips.append(np.clip(clip, -1, 1))
    return clips


def _check_festival() -> None:
    """``ValueError`` naming what to install when festival or one of :data:`FESTIVAL_VOICES` is missing."""
    packages = " ".join(["festival", *FESTIVAL_VOICES.values()])
    if shutil.which("festival") is None:
        raise ValueError(
            "audio demo: festival_per_class > 0 needs the festival speech synthesiser, which was not found on "
            f"PATH; install it with its voices (Debian/Ubuntu: `apt-get install -y {packages}`) or set "
            "festival_per_class to 0"
        )
    out = subprocess.run(["festival", "--pipe"], input="(print (voice.list))", capture_output=True, text=True,
                         check=True).stdout
    missing = [v for v in FESTIVAL_VOICES if v not in out.replace("(", " ").replace(")", " ").split()]
    if missing:
        raise ValueError(
            f"audio demo: festival is installed but lacks the voice(s) {', '.join(missing)}; install "
            f"`apt-get install -y {' '.join(FESTIVAL_VOICES[v] for v in missing)}` or set festival_per_class to 0"
        )


def _festival_clips(n_per_class: int, seed: int):
    """``(digit, speaker, k, clip, rate)`` for ``n_per_class`` festival sessions of the ten digits.

    One festival process synthesises every utterance (a Scheme script: the voices in turn, a
    ``Duration_Stretch`` of 0.8-1.25 per session, each digit its own utterance at the voice's own rate); the
    silence around each word is trimmed 40 dB below its peak (festival's silence is not exact zeros), then
    :func:`_postprocess` pads it, sets the gain and adds noise exactly as for espeak. Deterministic from
    ``seed`` (festival is).
    """
    import tempfile

    import soundfile as sf

    rng = np.random.default_rng([seed, 7])  # its own stream: the espeak part does not change
    voices = list(FESTIVAL_VOICES)
    sessions = [{"k": k, "voice": voices[k % len(voices)], "stretch": float(rng.uniform(0.8, 1.25)),
                 "seed": int(rng.integers(2**31))} for k in range(n_per_class)]
    with tempfile.TemporaryDirectory() as tmp:
        script = []
        for s in sorted(sessions, key=lambda s: voices.index(s["voice"])):  # each voice loaded once
            script += [f"(voice_{s['voice']})", f"(Parameter.set 'Duration_Stretch {s['stretch']:.3f})"]
            script += [f'(utt.save.wave (utt.synth (Utterance Text "{d}")) "{tmp}/{s["k"]}_{d}.wav" \'riff)'
                       for d in DIGITS]
        (Path(tmp) / "digits.scm").write_text("\n".join(script) + "\n")
        subprocess.run(["festival", "-b", str(Path(tmp) / "digits.scm")], capture_output=True, check=True)
        for s in sessions:
            words, sr = [], None
            for d in DIGITS:
                wave, sr = sf.read(f"{tmp}/{s['k']}_{d}.wav", dtype="float32")
                words.append(_trim_below_peak(wave, int(0.01 * sr), top_db=40.0))
            for d, clip in zip(DIGITS, _postprocess(words, sr, np.random.default_rng(s["seed"]))):
                yield d, f"festival-{s['voice']}", s["k"], clip, sr


def _check_flite() -> None:
    """``ValueError`` when flite or one of :data:`FLITE_VOICES` is missing: flite speaks an unknown voice
    silently with its default, kal, which is festival's test speaker."""
    if shutil.which("flite") is None:
        raise ValueError(
            "audio demo: flite_per_class > 0 needs the CMU flite speech synthesiser, which was not found on "
            "PATH; install it (Debian/Ubuntu: `apt-get install -y flite`) or set flite_per_class to 0"
        )
    listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout.split()
    missing = [v for v in FLITE_VOICES if v not in listed]
    if missing:
        raise ValueError(f"audio demo: flite lacks the voice(s) {', '.join(missing)} (`flite -lv` lists "
                         f"{' '.join(listed[2:])}); install Debian's flite package or set flite_per_class to 0")


def _check_mbrola() -> None:
    """``ValueError`` naming the packages when the mbrola program or one of :data:`MBROLA_VOICES` is missing."""
    engine = shutil.which("mbrola") is not None
    if not engine:
        missing = list(MBROLA_VOICES)
    else:  # espeak-ng loads the voice's diphone file without speaking (-q) and fails if it is absent
        missing = [v for v in MBROLA_VOICES
                   if subprocess.run(["espeak-ng", "-v", f"mb-{v}", "-q", "one"], capture_output=True).returncode]
    if missing:
        packages = " ".join(([] if engine else ["mbrola"]) + [MBROLA_VOICES[v] for v in missing])
        raise ValueError(
            f"audio demo: mbrola_per_class > 0 needs the MBROLA voice(s) {', '.join(missing)}; install them "
            f"(Debian, components contrib and non-free: `apt-get install -y {packages}`) or set mbrola_per_class to 0"
        )


def _check_pico() -> None:
    """``ValueError`` naming the package when SVOX Pico's ``pico2wave`` is missing."""
    if shutil.which("pico2wave") is None:
        raise ValueError(
            "audio demo: pico_per_class > 0 needs SVOX Pico's pico2wave, which was not found on PATH; install it "
            "(Debian, component non-free: `apt-get install -y libttspico-utils`) or set pico_per_class to 0"
        )


def _synthesise_to_file(cmd: list[str], out: Path, what: str) -> tuple[np.ndarray, int]:
    """Run one synthesiser call that writes ``out``; a failure or silence is a ``ValueError`` naming ``what``
    (the synthesiser and voice) and the command."""
    import soundfile as sf

    try:
        subprocess.run(cmd, capture_output=True, check=True, text=True)
        wave, sr = sf.read(out, dtype="float32")
    except (subprocess.CalledProcessError, sf.LibsndfileError) as e:
        detail = getattr(e, "stderr", None) or e
        raise ValueError(f"audio demo: {what} failed ({' '.join(cmd)}): {detail}") from None
    if wave.size == 0 or np.abs(wave).max() < 1e-3:
        raise ValueError(f"audio demo: {what} wrote silence ({' '.join(cmd)})")
    return wave, sr


@dataclass(frozen=True)
class TrainingSynthesiser:
    """A synthesiser the demo can add to *training* (``<name>_per_class`` sessions of the ten digits).

    ``prosody(rng)`` draws one session's speaking rate and pitch; ``command(text, voice, prosody, scale, out)``
    is the call that speaks ``text`` into ``out`` with durations stretched by the vocal-tract ``scale`` (see
    :func:`_training_clips`). ``stream`` seeds the synthesiser's own random stream, so adding or resizing one
    changes no other part of the demo set.
    """

    voices: tuple[str, ...]
    stream: int
    check: Callable[[], None]
    prosody: Callable[[np.random.Generator], dict]
    command: Callable[[str, str, dict, float, Path], list[str]]


def _flite_command(text, voice, prosody, scale, out):
    features = {"duration_stretch": prosody["stretch"] * scale}
    if FLITE_VOICES[voice]:
        features["int_f0_target_mean"] = prosody["f0"]
    return ["flite", "-voice", voice, *[a for f, v in features.items() for a in ("--setf", f"{f}={v:.3f}")],
            "-t", text, "-o", str(out)]


def _mbrola_command(text, voice, prosody, scale, out):
    return ["espeak-ng", "-v", f"mb-{voice}", "-s", str(round(prosody["wpm"] / scale)), "-p", str(prosody["pitch"]),
            "-w", str(out), text]


def _pico_command(text, voice, prosody, scale, out):
    speed = round(prosody["speed"] / scale)  # pico's levels are percent of the voice's own rate and pitch
    return ["pico2wave", "-l", voice, "-w", str(out),
            f'<speed level="{speed}"><pitch level="{prosody["pitch"]}">{text}</pitch></speed>']


TRAINING_SYNTHESISERS = {
    # a duration stretch of 0.8-1.25 and, for voices that follow it, a mean F0 of 85-165 Hz
    "flite": TrainingSynthesiser(tuple(FLITE_VOICES), 11, _check_flite,
                                 lambda rng: {"stretch": float(rng.uniform(0.8, 1.25)),
                                              "f0": float(rng.uniform(85, 165))}, _flite_command),
    # espeak's own ranges for its voices: 120-220 words per minute, pitch 15-85
    "mbrola": TrainingSynthesiser(tuple(MBROLA_VOICES), 13, _check_mbrola,
                                  lambda rng: {"wpm": int(rng.integers(120, 221)), "pitch": int(rng.integers(15, 86))},
                                  _mbrola_command),
    "pico": TrainingSynthesiser(PICO_VOICES, 17, _check_pico,
                                lambda rng: {"speed": int(rng.integers(80, 126)), "pitch": int(rng.integers(80, 126))},
                                _pico_command),
}


def _training_clips(name: str, n_per_class: int, seed: int, workers: int,
                    formant_scale: tuple[float, float] = (1.0, 1.0)):
    """``(digit, speaker, k, clip, rate)`` for ``n_per_class`` sessions of the ten digits by the training
    synthesiser ``name`` (:data:`TRAINING_SYNTHESISERS`).

    A session is one voice (in turn over the synthesiser's voices), its drawn prosody and a vocal-tract scale
    ``a`` uniform in ``formant_scale``: the words are synthesised ``a`` times slower and then played ``a`` times
    faster (resampled), which scales formants and pitch by ``a`` at the drawn duration. Each digit is its own call
    (about 0.05 s; not every synthesiser leaves exact silence at an SSML break to cut at); the words are trimmed
    40 dB below their peak and go through :func:`_postprocess` like every clip.
    """
    import tempfile

    import torchaudio

    synth = TRAINING_SYNTHESISERS[name]
    rng = np.random.default_rng([seed, synth.stream])
    sessions = []
    for k in range(n_per_class):
        prosody = synth.prosody(rng)
        scale = round(float(rng.uniform(*formant_scale)), 2)
        sessions.append({"k": k, "voice": synth.voices[k % len(synth.voices)], "prosody": prosody, "scale": scale,
                         "seed": int(rng.integers(2**31))})
    with tempfile.TemporaryDirectory() as tmp:

        def session(s):
            waves = []
            for d in DIGITS:
                out = Path(tmp) / f"{s['k']}_{d}.wav"
                cmd = synth.command(d, s["voice"], s["prosody"], s["scale"], out)
                waves.append(_synthesise_to_file(cmd, out, f"{name} voice {s['voice']!r} speaking {d!r}"))
            sr = waves[0][1]
            if s["scale"] != 1:  # read as sampled at scale * sr, resampled to sr: every frequency times scale
                # in float64: in float32 the result depends on torch's thread count (under OMP_NUM_THREADS=1 and 2 a
                # few clips came out one 16-bit step apart, and so did every score trained on them)
                waves = [(torchaudio.functional.resample(torch.from_numpy(w).double(), round(100 * s["scale"]), 100)
                          .float().numpy(), rate) for w, rate in waves]
            words = [_trim_below_peak(w, int(0.01 * sr), top_db=40.0) for w, _ in waves]
            return _postprocess(words, sr, np.random.default_rng(s["seed"])), sr

        with ThreadPoolExecutor(workers) as pool:  # the work is in synthesiser processes: threads suffice
            results = list(pool.map(session, sessions))
    for s, (clips, sr) in zip(sessions, results):
        for d, clip in zip(DIGITS, clips):
            yield d, f"{name}-{s['voice']}", s["k"], clip, sr


def _split_on_silence(wave: np.ndarray, min_gap: int) -> list[np.ndarray]:
    """Cut at runs of exact digital silence (espeak writes true zeros in SSML breaks) >= ``min_gap``."""
    quiet = np.abs(wave) < 1e-4
    edges = np.flatnonzero(np.diff(np.r_[0, quiet.astype(np.int8), 0]))
    runs = edges.reshape(-1, 2)
    gaps = runs[(runs[:, 1] - runs[:, 0]) >= min_gap]
    bounds = np.r_[0, gaps.ravel(), len(wave)].reshape(-1, 2)
    return [_trim(wave[a:b]) for a, b in bounds if b - a > 0 and np.abs(wave[a:b]).max() >= 1e-4]


def _trim_below_peak(wave: np.ndarray, frame: int, top_db: float) -> np.ndarray:
    """Drop leading / trailing ``frame``-sample frames whose RMS is ``top_db`` below the loudest frame's.

    The rule of ``librosa.effects.trim`` on non-overlapping frames, in NumPy: librosa's first call costs
    tens of seconds of numba compilation on a busy CPU, for a few milliseconds of work.
    """
    n = max(1, len(wave) // frame)
    rms = np.sqrt(np.mean(wave[: n * frame].reshape(n, -1) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-top_db / 20))
    return wave[loud[0] * frame : (loud[-1] + 1) * frame]


def _trim(wave: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) >= 1e-4)
    return wave[loud[0] : loud[-1] + 1] if loud.size else wave


MODALITY = AudioModality()
