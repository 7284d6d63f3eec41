"""The fastest exact inference form of a model: ``uniperc.inference.prepare(model)``.

:func:`prepare` returns a :class:`FastModel` that computes what ``model.eval()`` computes (to float rounding,
rtol 1e-4) faster, by three steps (measured on the CPU, docs/training.md "Fast inference"):

* **deploy form**: a re-parameterised copy (:func:`uniperc.reparameterize`); a joint
  :class:`~uniperc.multimodal.MultiModalNet` that keeps BatchNorm statistics per modality has one deploy form per
  modality (:meth:`~uniperc.multimodal.MultiModalNet.deploy_copy`), built on a modality's first call and cached;
* **layout** (:func:`choose_layout`): channels_last on the CPU, where it was measured as fast as or faster than
  NCHW for the deploy forms of all four families; the given layout elsewhere (not measured);
* **torch.compile** (:func:`should_compile`): compiling costs minutes on a CPU and saves a fraction of each batch,
  so ``"auto"`` compiles only for jobs of at least :data:`COMPILE_MIN_IMAGES` images; the compiled graph
  serves the batch shape it was compiled for and other shapes (a last partial batch) run eagerly, so nothing
  recompiles.

The copies run under ``torch.inference_mode``; the model passed in is left unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .multimodal import MultiModalNet
from .reparam import reparameterize

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
#: ``compile="auto"`` compiles from this many images on: unireplknet_a (batch 8, 128 px, one CPU thread) compiled
#: in ~100 s and then ran 1.7x faster (66 vs 38 images/s), which pays back after ~9,000 images.
COMPILE_MIN_IMAGES = 10_000
SHARED = "*"  # the key of the deploy form that serves every modality (no modality name has a "*")


def choose_layout(layout: str, device: torch.device) -> torch.memory_format:
    """The memory format ``layout`` (``"auto"``, ``"nchw"``, ``"channels_last"``) means on ``device``."""
    if layout == "auto":
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {list(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def should_compile(compile: bool | str, images: int | None) -> bool:
    """Whether to ``torch.compile``: ``True`` / ``False`` as given, ``"auto"`` for jobs of at least
    :data:`COMPILE_MIN_IMAGES` images (``images=None``: an open-ended job, not compiled)."""
    if compile == "auto":
        return images is not None and images >= COMPILE_MIN_IMAGES
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


class FastModel(nn.Module):
    """Inference-only stand-in for a model (see :func:`prepare`): ``fast(x)`` for a plain model,
    ``fast(x, modality)`` for a :class:`~uniperc.multimodal.MultiModalNet`, whose ``tasks``, ``heads`` and
    ``modalities`` it also exposes (the heads' task logic: loss, metrics, postprocessing). It runs on the device
    its model was on when prepared (move the model first)."""

    def __init__(self, model: nn.Module, memory_format: torch.memory_format, compile: bool):
        super().__init__()
        self._source = [model]  # a list: not a submodule, so the train-form weights are not this module's
        self.memory_format = memory_format
        self.use_compile = compile
        self.device = next(model.parameters()).device
        self.forms = nn.ModuleDict()  # deploy-form copies: SHARED serves every modality, else one per modality
        self._graphs = {}  # modality -> (compiled deploy form, the input shape it serves)

    @property
    def multimodal(self) -> bool:
        return isinstance(self._source[0], MultiModalNet)

    @property
    def tasks(self) -> dict:
        return self._source[0].tasks

    @property
    def heads(self) -> nn.ModuleDict:
        return self._source[0].heads

    @property
    def modalities(self) -> list[str]:
        return self._source[0].modalities

    def train(self, mode: bool = True) -> "FastModel":
        if mode:
            raise ValueError("a FastModel is a deploy-form inference copy and cannot train: train the source model")
        return super().train(False)

    def _form(self, modality: str | None) -> nn.Module:
        """The deploy-form copy that runs ``modality`` (built on first use)."""
        source = self._source[0]
        if self.multimodal:
            if modality not in source.modalities:
                raise ValueError(f"modality {modality!r} has no stem in this model; it has {source.modalities}")
            key = modality if source.norm_stats_per_modality else SHARED
        elif modality is not None:
            raise ValueError(f"this {type(source).__name__} has no modalities; call it without one")
        else:
            key = SHARED
        if key not in self.forms:
            with torch.no_grad():
                if self.multimodal:
                    deployed = source.deploy_copy(None if key == SHARED else key)
                else:
                    deployed = reparameterize(copy.deepcopy(source).eval())
            deployed = deployed.to(self.device).to(memory_format=self.memory_format).requires_grad_(False)
            self.forms[key] = deployed
        return self.forms[key]

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        form = self._form(modality)
        args = (modality,) if self.multimodal else ()
        with torch.inference_mode():
            x = x.to(self.device).contiguous(memory_format=self.memory_format) if x.ndim == 4 else x.to(self.device)
            if self.use_compile:  # one graph per modality: each has its own stem, head and input shape
                name = modality or SHARED
                if name not in self._graphs:
                    self._graphs[name] = (torch.compile(form, dynamic=False), x.shape)
                graph, shape = self._graphs[name]
                if x.shape == shape:
                    form = graph
            out = form(x, *args)
            return out.contiguous() if out.ndim == 4 else out


def prepare(model: nn.Module, modality: str | None = None, layout: str = "auto", compile: bool | str = "auto",
            images: int | None = None) -> FastModel:
    """The fastest exact inference form of ``model`` (a :class:`~uniperc.multimodal.MultiModalNet` or a plain
    uniperc / timm model, train or deploy form, in eval mode); its outputs equal ``model``'s in eval mode.

    ``layout``: ``"auto"`` (:func:`choose_layout`), ``"nchw"`` or ``"channels_last"``. ``compile``: ``True``,
    ``False`` or ``"auto"`` (:func:`should_compile`, from ``images``, the number of images the job will run).
    ``modality`` builds that modality's deploy form now (``ValueError`` if the model has no such modality);
    the others are built on their first call. ``ValueError`` for a model in train mode: its outputs (batch
    statistics, dropout) are not inference's.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(f"the {type(model).__name__} is in train mode, whose outputs (batch statistics, dropout) "
                         "inference does not reproduce: call model.eval() first")
    if isinstance(model, FastModel):
        raise ValueError("the model is already a FastModel")
    memory_format = choose_layout(layout, next(model.parameters()).device)
    fast = FastModel(model, memory_format, should_compile(compile, images)).eval()
    if modality is not None:
        fast._form(modality)
    return fast
