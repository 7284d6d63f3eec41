"""Effective receptive field (ERF) of any model, stage or block, on any modality's inputs.

Recipe (RepLKNet, Ding et al. CVPR 2022, ``erf/visualize_erf.py`` and ``erf/analyze_erf.py``; our reading):

1. Put the model in eval mode (BN statistics frozen, no drop-path). For each input sample take the chosen
   feature map ``F`` (``B x C x h x w``), its central position ``(h // 2, w // 2)`` and the score
   ``s = sum_c ReLU(F[c, h//2, w//2])``.
2. The contribution map of the sample is ``sum_over_input_channels ReLU(ds/dx)`` (``H x W``). RepLKNet
   keeps only positive gradients (ReLU); ``grad_mode="abs"`` uses ``|ds/dx|`` instead.
3. Average the maps over N samples (batching does not change the result: in eval mode samples are
   independent, so the gradient of the batch sum w.r.t. each sample is that sample's own gradient).
4. For display and the area ratios: ``log10(map + 1)`` then divide by the maximum (RepLKNet rescales
   this way "for comparability among models"; note that ``log10(x + 1)`` is nearly linear when the raw
   gradients are much smaller than 1, as they are for most untrained networks).

Metrics:

* **High-contribution area ratio** at t in (0.2, 0.3, 0.5, 0.99) (RepLKNet's Table): the area, as a
  fraction of the input, of the smallest square centred on the map centre whose sum of the log-scaled
  map exceeds t times the total. RepLKNet grows the square from side 3 and stops at side ``h - 1``; we
  start at side 1 and let the square grow (clipped to the map) until it covers the whole map, so the
  metric is defined for every map (a square clipped by the border counts only its in-map area).
* **Gaussianity** (to check UniConvNet's claim that its ERF is large *and* keeps an asymptotically
  Gaussian distribution): an axis-aligned 2-D Gaussian ``A exp(-(dy^2 / 2 sy^2 + dx^2 / 2 sx^2))``
  (centre free, no offset) is fitted by ``scipy.optimize.curve_fit`` to the averaged ``|ds/dx|`` map
  (computed in the same backward passes) scaled to max 1 -- the distribution itself, not its log, and
  not sign-clipped (see :func:`analyse_erf`); we report the coefficient of determination R^2 and the
  fitted sigmas in input pixels. A Gaussian with an offset would also fit a flat map well, hence none.

Command line::

    python -m uniperc.erf --model unireplknet_a --modality image --out erf.png
    python -m uniperc.erf --checkpoint runs/audio --modality audio --layer stages.2 --out erf.png
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
GRAD_MODES = ("relu", "abs")


class _StopForward(Exception):
    """Raised by the capture hook so that layers after the chosen one are not computed."""


def _target_forward(model: nn.Module, layer: str | None):
    """A function ``x -> feature map`` for the chosen layer.

    ``layer=None``: ``model.forward_features`` when the model has it (timm models), else ``model``
    itself; a dotted sub-module name (``"stages.2"``, ``"stages.2.blocks.1"``, ``"stem"``): the output of
    that sub-module, captured by a forward hook that then stops the forward pass.
    """
    if layer is None:
        return getattr(model, "forward_features", model)
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") < 2]
        raise ValueError(f"layer {layer!r} is not a sub-module of the model; e.g. {names[:12]}") from None

    def run(x):
        captured = {}

        def hook(_mod, _inp, out):
            captured["out"] = out
            raise _StopForward

        handle = module.register_forward_hook(hook)
        try:
            model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "out" not in captured:
            raise ValueError(f"layer {layer!r} was not called in the model's forward pass")
        return captured["out"]

    return run


def _batches(inputs, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim != 4:
            raise ValueError(f"inputs must be N x C x H x W, got shape {tuple(inputs.shape)}")
        yield from inputs.split(batch_size)
        return
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
            raise ValueError(f"inputs[{i}] must be a C x H x W or B x C x H x W tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        yield x.unsqueeze(0) if x.ndim == 3 else x


def erf_map(model: nn.Module, inputs, layer: str | None = None, *, grad_mode: str = "relu",
            batch_size: int = 8) -> np.ndarray:
    """The raw ERF: the contribution map ``H x W`` averaged over the samples (steps 1-3 above).

    ``inputs``: an ``N x C x H x W`` tensor, or an iterable of ``C x H x W`` / ``B x C x H x W`` tensors
    (all of one spatial size). The model is left in eval mode and its parameters receive no gradient.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    return _mean_contributions(model, inputs, layer, batch_size)[grad_mode]


def _mean_contributions(model, inputs, layer, batch_size) -> dict:
    """Both averaged maps (``"relu"`` and ``"abs"``, from the same backward passes) and ``"count"``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    forward = _target_forward(model, layer)
    device = next(iter(model.parameters()), torch.empty(0)).device
    totals, count = None, 0
    for x in _batches(inputs, batch_size):
        x = x.detach().to(device=device, dtype=torch.float32).requires_grad_(True)
        out = forward(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise ValueError(f"the chosen layer must output a B x C x h x w feature map, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        h, w = out.shape[-2:]
        score = F.relu(out[:, :, h // 2, w // 2]).sum()
        (grad,) = torch.autograd.grad(score, x, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x)
        if not torch.isfinite(grad).all():
            raise ValueError("the input gradient has NaN/inf values (check the model and the inputs)")
        maps = {"relu": F.relu(grad).sum(dim=(0, 1)).double().cpu(), "abs": grad.abs().sum(dim=(0, 1)).double().cpu()}
        if totals is not None and totals["abs"].shape != maps["abs"].shape:
            raise ValueError(f"all inputs need one spatial size; got {tuple(totals['abs'].shape)} "
                             f"and {tuple(maps['abs'].shape)}")
        totals = maps if totals is None else {k: totals[k] + maps[k] for k in maps}
        count += x.shape[0]
    if totals is None:
        raise ValueError("inputs is empty")
    return {**{k: (v / count).numpy() for k, v in totals.items()}, "count": count}


def log_scale(raw: np.ndarray) -> np.ndarray:
    """RepLKNet's display scaling: ``log10(raw + 1)`` divided by its maximum (all zeros stays zeros)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or (raw < 0).any():
        raise ValueError(f"an ERF map must be a non-negative 2-D array, got shape {raw.shape}")
    out = np.log10(raw + 1.0)
    peak = out.max()
    return out / peak if peak > 0 else out


def area_ratios(erf: np.ndarray, thresholds=AREA_THRESHOLDS) -> dict[float, float]:
    """High-contribution area ratio for each threshold t (see the module docstring).

    The square has odd side ``2i + 1`` centred on ``(H // 2, W // 2)``; its ratio is its in-map area
    divided by ``H * W``.
    """
    erf = np.asarray(erf, dtype=np.float64)
    if erf.ndim != 2 or (erf < 0).any():
        raise ValueError(f"erf must be a non-negative 2-D array, got shape {erf.shape}")
    total = erf.sum()
    if total <= 0:
        raise ValueError("erf is all zeros: the chosen output does not depend on the input")
    for t in thresholds:
        if not 0 < t < 1:
            raise ValueError(f"thresholds must lie in (0, 1), got {t}")
    h, w = erf.shape
    cy, cx = h // 2, w // 2
    # Sum of the clipped square of half-side i for every i, from a 2-D prefix sum.
    csum = np.pad(erf, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    radii = np.arange(max(cy, cx, h - 1 - cy, w - 1 - cx) + 1)
    y0, y1 = np.maximum(cy - radii, 0), np.minimum(cy + radii + 1, h)
    x0, x1 = np.maximum(cx - radii, 0), np.minimum(cx + radii + 1, w)
    sums = csum[y1, x1] - csum[y0, x1] - csum[y1, x0] + csum[y0, x0]
    areas = (y1 - y0) * (x1 - x0) / (h * w)
    out = {}
    for t in thresholds:
        reached = np.nonzero(sums > t * total)[0]
        out[float(t)] = float(areas[reached[0]])
    return out


def _gaussian(coords, amplitude, y0, x0, sigma_y, sigma_x):
    y, x = coords
    return amplitude * np.exp(-((y - y0) ** 2 / (2 * sigma_y ** 2) + (x - x0) ** 2 / (2 * sigma_x ** 2)))


def gaussian_fit(erf: np.ndarray) -> dict[str, float]:
    """Fit an axis-aligned 2-D Gaussian to ``erf / erf.max()``: R^2, sigmas and centre (pixels)."""
    from scipy.optimize import curve_fit

    erf = np.asarray(erf, dtype=np.float64)
    if erf.ndim != 2 or erf.max() <= 0:
        raise ValueError(f"erf must be a 2-D array with a positive maximum, got shape {erf.shape}")
    z = erf / erf.max()
    h, w = z.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = z.sum()
    my, mx = (y * z).sum() / mass, (x * z).sum() / mass
    sy0 = math.sqrt(max((((y - my) ** 2) * z).sum() / mass, 0.25))
    sx0 = math.sqrt(max((((x - mx) ** 2) * z).sum() / mass, 0.25))
    coords = np.vstack([y.ravel(), x.ravel()])
    try:
        params, _ = curve_fit(_gaussian, coords, z.ravel(), p0=(1.0, my, mx, sy0, sx0),
                              bounds=([0, -h, -w, 0.05, 0.05], [np.inf, 2 * h, 2 * w, 10 * h, 10 * w]),
                              maxfev=20000)
    except RuntimeError as err:  # no convergence: report it as a failed fit, not a crash
        return dict(r2=float("nan"), sigma_y=float("nan"), sigma_x=float("nan"),
                    center_y=float("nan"), center_x=float("nan"), amplitude=float("nan"), error=str(err))
    resid = z.ravel() - _gaussian(coords, *params)
    ss_tot = ((z - z.mean()) ** 2).sum()
    r2 = 1.0 - (resid ** 2).sum() / ss_tot if ss_tot > 0 else float("nan")
    amplitude, cy, cx, sy, sx = (float(p) for p in params)
    return dict(r2=float(r2), sigma_y=sy, sigma_x=sx, center_y=cy, center_x=cx, amplitude=amplitude)


@dataclass
class ERFResult:
    """The averaged maps, the log-scaled heatmap and the metrics.

    ``raw``: the map of the chosen ``grad_mode`` (heatmap and area ratios); ``magnitude``: the |grad| map
    (Gaussian fit).
    """

    raw: np.ndarray
    magnitude: np.ndarray
    scaled: np.ndarray
    area_ratio: dict[float, float]
    gaussian: dict[str, float]
    num_samples: int
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain numbers (JSON-serialisable) for tables."""
        row = {f"area@{t:g}": r for t, r in self.area_ratio.items()}
        row.update(gauss_r2=self.gaussian["r2"], sigma_y=self.gaussian["sigma_y"],
                   sigma_x=self.gaussian["sigma_x"], input_hw=list(self.raw.shape), num_samples=self.num_samples)
        row.update(self.meta)
        return row


def analyse_erf(model: nn.Module, inputs, layer: str | None = None, *, grad_mode: str = "relu",
                batch_size: int = 8, thresholds=AREA_THRESHOLDS, meta: dict | None = None) -> ERFResult:
    """:func:`erf_map` plus every metric; ``meta`` is stored with the result (model/modality names...).

    The heatmap and area ratios use the ``grad_mode`` map (RepLKNet's ReLU by default); the Gaussian is
    fitted to the |grad| map of the same backward passes. Why: ReLU keeps only positive gradients, and
    for a network whose weights change sign from tap to tap (any untrained one) that leaves a speckle
    of zeros whose fit measures the speckle, not the shape (a random 10-layer 3x3 ReLU net: R^2 0.64 on
    the ReLU map, 0.93 on |grad|).
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    maps = _mean_contributions(model, inputs, layer, batch_size)
    scaled = log_scale(maps[grad_mode])
    return ERFResult(raw=maps[grad_mode], magnitude=maps["abs"], scaled=scaled,
                     area_ratio=area_ratios(scaled, thresholds), gaussian=gaussian_fit(maps["abs"]),
                     num_samples=maps["count"], meta=dict(layer=layer, grad_mode=grad_mode, **(meta or {})))


def plot_erf(result: ERFResult | np.ndarray, ax=None, title: str | None = None, colorbar: bool = True):
    """Draw the log-scaled heatmap (RepLKNet's ``RdYlGn`` colour map); returns the matplotlib axes."""
    data = result.scaled if isinstance(result, ERFResult) else log_scale(result)
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4, 4))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is None and isinstance(result, ERFResult):
        title = (f"area@0.2={result.area_ratio.get(0.2, float('nan')):.3f}  "
                 f"R²={result.gaussian['r2']:.2f}")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def modality_inputs(modality: str, num_samples: int = 16, *, split: str = "validation",
                    size: int | tuple[int, int] | None = None, seed: int = 0, cfg: dict | None = None,
                    **demo_kw) -> torch.Tensor:
    """``num_samples`` adapter outputs (``N x C' x H x W``) of a modality's offline demo set.

    ``cfg``: adapter settings; by default the modality's ``demo_config()`` where it has one (what training
    on the demo set uses). ``size`` resizes them bilinearly (RepLKNet measures on 1024 x 1024 inputs so
    that the ERF of a large network is not cut by the border); ``demo_kw`` go to the demo generator.
    """
    import uniperc.modalities as modalities

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    mod = modalities.get(modality)
    if cfg is None and hasattr(mod, "demo_config"):
        cfg = mod.demo_config()
    dsd = mod.load(source="demo", cfg=cfg, seed=seed, **demo_kw)
    if split not in dsd:
        raise ValueError(f"split must be one of {list(dsd)}, got {split!r}")
    ds = dsd[split]
    n = min(num_samples, len(ds))
    x = torch.stack(ds[:n]["inputs"]).float()
    if size is not None:
        x = F.interpolate(x, size=(size, size) if isinstance(size, int) else tuple(size), mode="bilinear",
                          align_corners=False)
    return x


class ModalityPath(nn.Module):
    """One modality's path through a :class:`~uniperc.multimodal.MultiModalNet`: its stem, then the shared
    stages, under the plain timm model's names (``stem``, ``stages.2``, ...) so ``layer`` means the same."""

    def __init__(self, net: nn.Module, modality: str):
        super().__init__()
        if modality not in net.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {list(net.stems)}")
        self.stem, self.stages = net.stems[modality], net.stages

    def forward_features(self, x):
        return self.stages(self.stem(x))

    forward = forward_features


def load_model(name: str | None = None, checkpoint: str | None = None, modality: str = "image",
               in_chans: int = 3) -> nn.Module:
    """A timm model by name (random weights; ``uniperc`` variants are registered on import), or
    ``modality``'s path through an exported model (:func:`uniperc.export.load`; ``checkpoint`` is the
    export directory or a training run's ``output_dir``, whose export lives in ``model/``)."""
    import timm

    import uniperc  # noqa: F401  (registers the variants in timm)

    if (name is None) == (checkpoint is None):
        raise ValueError("give exactly one of --model NAME or --checkpoint DIR")
    if checkpoint is not None:
        from .export import is_export_dir, load

        directory = Path(checkpoint)
        if not is_export_dir(directory) and is_export_dir(directory / "model"):
            directory = directory / "model"
        return ModalityPath(load(directory), modality)
    if not timm.is_model(name):
        raise ValueError(f"--model {name!r} is not a registered timm model")
    return timm.create_model(name, pretrained=False, in_chans=in_chans)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m uniperc.erf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="timm model name (random init), e.g. unireplknet_a")
    parser.add_argument("--checkpoint", help="export directory or training run directory (uniperc.export.load)")
    parser.add_argument("--modality", default="image", help="modality whose demo inputs to use")
    parser.add_argument("--layer", default=None, help="sub-module whose output to analyse, e.g. stages.2 "
                                                      "(default: forward_features)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="resize inputs to SIZE x SIZE")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--grad-mode", default="relu", choices=GRAD_MODES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="erf.png", help="heatmap PNG")
    parser.add_argument("--save-npy", default=None, help="also save the raw averaged map (.npy)")
    args = parser.parse_args(argv)

    import uniperc.modalities as modalities

    torch.manual_seed(args.seed)
    model = load_model(args.model, args.checkpoint, modality=args.modality,
                       in_chans=modalities.get(args.modality).in_chans())
    x = modality_inputs(args.modality, args.num_samples, split=args.split, size=args.size, seed=args.seed)
    result = analyse_erf(model, x, args.layer, grad_mode=args.grad_mode, batch_size=args.batch_size,
                         meta=dict(model=args.model or args.checkpoint, modality=args.modality))
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(4, 4))
    plot_erf(result, ax=fig.add_subplot())
    fig.suptitle(f"ERF {args.model or args.checkpoint} [{args.layer or 'features'}] on {args.modality}", fontsize=9)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    if args.save_npy:
        np.save(args.save_npy, result.raw)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
