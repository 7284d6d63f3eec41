"""The training loop: ``run(config) -> {"metrics", "history", "output_dir", ...}``.

One loop for one modality or several: every batch comes from one modality (order from
:func:`~uniperc.train.data.schedule`), goes through that modality's stem, the shared stages and that
modality's head, and its task loss is back-propagated. Accelerate provides the devices, processes (DDP or
FSDP), mixed precision, gradient accumulation, checkpoint state and trackers.

:func:`run` is four stages, each a function: :func:`setup` (validate, load data, build, and only then touch the
run folder), :func:`fit`, :func:`final_evaluation` and :func:`export_and_summarise`.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .. import runs
from ..data import TaskData, dataset_options, extra_test_splits, load_task, make_loader
from ..scoring import evaluate
from ..tasks import get_task
from . import checkpoint as ckpt
from .config import backbone_kwargs, config_differences, resolve
from .data import SeededAugment, schedule
from .tracking import CSVTracker, flatten, plot_curves


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped, and no checkpoint holds weights updated by that step."""


@dataclass
class Session:
    """Everything the stages of one run share."""

    cfg: dict
    accelerator: object
    out_dir: Path
    tasks: dict[str, TaskData]
    model: torch.nn.Module        # as prepared by Accelerate (DDP / FSDP wrapper, or the model itself)
    unwrapped: torch.nn.Module
    optimizer: object
    scheduler: object
    ema: object | None
    train_sets: dict
    train_loaders: dict
    eval_loaders: dict
    state: dict
    lengths: dict[str, int]       # training batches per epoch of each modality (on this process)
    total_steps: int
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.time)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model


def run(config: dict, resume: bool | str = False, force: bool = False) -> dict:
    """Train as ``config`` says (see :mod:`uniperc.train.config`); returns metrics, history and paths.

    ``resume``: ``True`` continues from the newest complete checkpoint in ``output_dir`` (a fresh start if
    there is none), a path continues from that checkpoint; ``False`` starts over (old checkpoints are set aside
    and removed only once the new run has written its first complete checkpoint). A resumed run whose model,
    data or task settings differ from the checkpoint's raises ``ValueError`` listing the differences unless
    ``force``. Every configuration error is a ``ValueError`` raised before any file in ``output_dir`` is
    touched; :class:`NonFiniteLossError` if the loss becomes NaN/inf.
    """
    s = setup(resolve(config), resume, force)
    fit(s)
    results = final_evaluation(s)
    return export_and_summarise(s, results)


# ------------------------------------------------------------------------------------------------ set up
def _accelerator(cfg: dict, num_modalities: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs,
                                  GradientAccumulationPlugin, ProjectConfiguration)

    # Accelerate keeps its settings in process-wide singletons; a second run() in the same process (a notebook,
    # the tests) with other settings (precision, accumulation) must start from fresh ones. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    t = cfg["train"]
    trackers = []
    if "tensorboard" in t["trackers"]:
        trackers.append("tensorboard")
    if "csv" in t["trackers"]:
        trackers.append(CSVTracker(cfg["output_dir"]))
    return Accelerator(
        mixed_precision=t["mixed_precision"],
        cpu=t["cpu"],
        # the accumulation window counts batches, whatever loader they came from (joint training interleaves
        # several loaders, so "end of dataloader" means nothing here)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t["grad_accum"], sync_with_dataloader=False,
                                                                adjust_scheduler=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg["seed"]),
        # joint training leaves the other modalities' stems and heads idle on each batch
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=num_modalities > 1)],
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=cfg["output_dir"], logging_dir=cfg["output_dir"]),
        step_scheduler_with_optimizer=False,
    )


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def build_model(cfg: dict, tasks: dict):
    """The :class:`~uniperc.multimodal.MultiModalNet` for a resolved config and loaded task data."""
    from ..multimodal import MultiModalNet

    specs = {name: {"task": d.task, "in_chans": d.in_chans, "num_outputs": d.num_outputs,
                    "output_names": d.output_names, "input_size": list(d.input_size),
                    "adapter_config": d.adapter_config,
                    "label_smoothing": cfg["modalities"][name]["label_smoothing"], "head": d.head,
                    "target_shape": d.target_shape and list(d.target_shape), "residual_channels": d.residual_channels,
                    "stem": d.stem, "views": d.views}
             for name, d in tasks.items()}
    return MultiModalNet(cfg["model"]["backbone"], specs, backbone_kwargs(cfg["model"]))


def _comparable(cfg: dict) -> dict:
    """The config as it is stored in a checkpoint (JSON types), so stored and new configs compare equal."""
    return json.loads(json.dumps(cfg, default=str))


def _resume_point(cfg: dict, resume: bool | str, force: bool, say) -> Path | None:
    """The checkpoint to resume from (``None``: fresh start), after checking it was trained with this config."""
    out_dir = Path(cfg["output_dir"])
    if not resume:
        return None
    point = runs.latest(out_dir) if resume is True else Path(resume)
    if point is None:
        say(f"no complete checkpoint in {runs.checkpoint_dir(out_dir)}: starting from scratch")
        return None
    saved = runs.read_trainer_state(point).get("config")
    if saved is None:
        raise ValueError(f"checkpoint {str(point)!r} does not record its config; cannot check it matches "
                         f"(resume with --force to continue anyway)")
    diffs = config_differences(saved, _comparable(cfg))
    if diffs and not force:
        raise ValueError(f"the config differs from the one checkpoint {str(point)!r} was trained with "
                         f"(checkpoint -> now): {'; '.join(diffs)}. Resume with --force to continue anyway")
    if diffs:
        say("warning: resuming with a changed config (--force): " + "; ".join(diffs))
    return point


def _schedule(optimizer, t: dict, steps_per_epoch: int, total_steps: int):
    from timm.scheduler import CosineLRScheduler

    total_updates = max(1, total_steps // t["grad_accum"])
    warmup = t["warmup_steps"] if t["warmup_steps"] is not None else round(
        t["warmup_epochs"] * steps_per_epoch / t["grad_accum"])
    warmup = min(warmup, total_updates - 1)
    return CosineLRScheduler(optimizer, t_initial=max(1, total_updates - warmup), lr_min=t["min_lr"],
                             warmup_t=warmup, warmup_lr_init=t["min_lr"], warmup_prefix=True, t_in_epochs=False)


def setup(cfg: dict, resume: bool | str = False, force: bool = False) -> Session:
    """Everything before the first step, in the order that keeps a failed request harmless: checks (config,
    resume point), data, model and optimizer; only then the run folder is written (old checkpoints set aside,
    ``config.yaml``, ``model_spec.json``) and a checkpoint restored."""
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    import uniperc  # noqa: F401  (registers the variants in timm)

    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    out_dir = Path(cfg["output_dir"])
    accelerator = _accelerator(cfg, len(cfg["modalities"]))
    if t["mixed_precision"] == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("train.mixed_precision 'fp16' needs a GPU; use 'bf16' on CPU")
    if t["ema"]["enabled"] and _is_fsdp(accelerator):
        raise ValueError("train.ema needs the whole model on every process; it is not supported under FSDP")
    resume_from = _resume_point(cfg, resume, force, accelerator.print)

    set_seed(cfg["seed"])
    with accelerator.main_process_first():  # the main process generates demo sets first
        tasks = {name: load_task(name, sec["source"], sec["config"], sec["path"], sec["demo"], cfg["seed"],
                                 sec["head"], sec["residual"], dataset_options(sec), sec["stem"])
                 for name, sec in cfg["modalities"].items()}
    for name, d in tasks.items():
        views = f"{d.views} views x " if d.views else ""
        accelerator.print(f"{name}: {d.task}, {d.num_outputs} outputs, input {views}{d.in_chans}x{d.input_size[0]}x"
                          f"{d.input_size[1]}{'' if d.stem == 'backbone' else f' ({d.stem} stem)'}, "
                          f"{len(d.splits['train'])}/{len(d.splits['validation'])}/"
                          f"{len(d.splits['test'])} train/val/test samples"
                          + "".join(f", {len(d.splits[s])} {s}" for s in extra_test_splits(d.splits)))
    names = list(tasks)
    train_sets = {n: SeededAugment(d.splits["train"], cfg["seed"]) for n, d in tasks.items()}
    loaders = [make_loader(train_sets[n], cfg["modalities"][n]["batch_size"], True, cfg["seed"], t["num_workers"])
               for n in names]
    # validation, test, then any extra evaluation split a modality's data has (e.g. audio's test_festival)
    eval_keys = [(split, n) for split in ("validation", "test") for n in names]
    eval_keys += [(split, n) for n in names for split in extra_test_splits(tasks[n].splits)]
    loaders += [make_loader(tasks[n].splits[split], _eval_bs(cfg["modalities"][n]), False, cfg["seed"],
                            t["num_workers"]) for split, n in eval_keys]

    set_seed(cfg["seed"])
    model = build_model(cfg, tasks)
    # the model is prepared (wrapped, and sharded under FSDP) before the optimizer is built on its parameters
    model = accelerator.prepare(model)
    # fused: one kernel for every parameter's update (CPU: 1.1 vs 4.8 ms a step for the 143 tensors of the audio
    # recipe's model, up to a tenth of a demo recipe's step on 2 cores); torch has it for CPU and CUDA only
    optimizer = create_optimizer_v2(model, opt="adamw", lr=t["lr"], weight_decay=t["weight_decay"],
                                    betas=tuple(t["betas"]), fused=accelerator.device.type in ("cpu", "cuda"))
    optimizer, *loaders = accelerator.prepare(optimizer, *loaders)
    k = len(names)
    train_loaders = dict(zip(names, loaders[:k]))
    eval_loaders = {}
    for (split, n), loader in zip(eval_keys, loaders[k:]):
        eval_loaders.setdefault(split, {})[n] = loader
    lengths = {n: len(dl) * cfg["modalities"][n]["repeat"] for n, dl in train_loaders.items()}
    for n, count in lengths.items():
        if count == 0:
            raise ValueError(f"modalities.{n}.batch_size {cfg['modalities'][n]['batch_size']} is too large: the "
                             f"{len(tasks[n].splits['train'])} training samples give no batch on each of "
                             f"{accelerator.num_processes} process(es)")
    steps_per_epoch = sum(lengths.values())
    total_steps = t["epochs"] * steps_per_epoch
    if t["max_steps"] is not None:
        total_steps = min(total_steps, t["max_steps"])
    scheduler = _schedule(optimizer, t, steps_per_epoch, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if t["ema"]["enabled"]:
        ema = ModelEmaV3(unwrapped, decay=t["ema"]["decay"], use_warmup=t["ema"]["warmup"])
        accelerator.register_for_checkpointing(ema)

    # ---- the request is valid and everything is built: now the run folder may change
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            aside = ckpt.set_aside(out_dir)
            if aside is not None:
                accelerator.print(f"fresh start: the previous checkpoints are kept in {aside} until this run "
                                  f"writes its first checkpoint")
            (out_dir / "metrics.csv").unlink(missing_ok=True)  # the CSV tracker appends
        (out_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
        (out_dir / runs.MODEL_SPEC_FILE).write_text(json.dumps(
            {"backbone": unwrapped.backbone_name, "backbone_kwargs": unwrapped.backbone_kwargs,
             "tasks": unwrapped.tasks}, indent=1))
    accelerator.wait_for_everyone()

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "updates": 0, "history": [], "elapsed": 0.0,
             "config": _comparable(cfg)}
    if resume_from is not None:
        state = dict(ckpt.load(accelerator, resume_from), config=_comparable(cfg))
        accelerator.print(f"resumed from {resume_from} (epoch {state['epoch']}, batch {state['step_in_epoch']} of "
                          f"that epoch, step {state['global_step']})")
    accelerator.init_trackers("logs", config=flatten(cfg))
    n_params = sum(p.numel() for p in unwrapped.parameters())
    accelerator.print(
        f"model: {cfg['model']['backbone']} {n_params / 1e6:.3f}M parameters, {accelerator.num_processes} "
        f"process(es) ({accelerator.distributed_type.value}) on {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision}; {steps_per_epoch} batches/epoch, {total_steps} steps")
    return Session(cfg=cfg, accelerator=accelerator, out_dir=out_dir, tasks=tasks, model=model, unwrapped=unwrapped,
                   optimizer=optimizer, scheduler=scheduler, ema=ema, train_sets=train_sets,
                   train_loaders=train_loaders, eval_loaders=eval_loaders, state=state, lengths=lengths,
                   total_steps=total_steps,
                   elapsed_before=state["elapsed"])


# ------------------------------------------------------------------------------------------------ fit
class _Window:
    """Training losses since the last log line, kept on the device: the loop reads them back (one host sync,
    one all-reduce) only at the logging interval and before each checkpoint, never per step."""

    def __init__(self, names: list[str], device):
        self.names, self.device = names, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(len(self.names), device=self.device, dtype=torch.float64)
        self.count = torch.zeros(len(self.names), device=self.device, dtype=torch.float64)
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)  # step of the first NaN/inf
        self.steps, self.samples, self.t0 = [], 0, time.time()

    def add(self, name: str, loss: torch.Tensor, step: int, where: str, samples: int) -> None:
        i = self.names.index(name)
        value = loss.detach().double()
        finite = torch.isfinite(value)
        self.loss[i] += torch.where(finite, value, torch.zeros_like(value))
        self.count[i] += 1
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, torch.full_like(self.first_bad, step),
                                     self.first_bad)
        self.steps.append((step, name, where))
        self.samples += samples

    def read(self, accelerator) -> tuple[dict[str, float], int | None, float]:
        """``(mean loss per modality seen, first non-finite step or None, samples/s)`` over every process."""
        packed = torch.cat([self.loss, self.count, self.first_bad.double()[None]])
        everyone = accelerator.gather(packed[None]).cpu()
        loss, count = everyone[:, :len(self.names)].sum(0), everyone[:, len(self.names):-1].sum(0)
        bad = [int(s) for s in everyone[:, -1].tolist() if s >= 0]
        means = {n: float(loss[i] / count[i]) for i, n in enumerate(self.names) if count[i] > 0}
        rate = self.samples * accelerator.num_processes / max(time.time() - self.t0, 1e-9)
        return means, (min(bad) if bad else None), rate


def mixup(inputs: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Mixup (Zhang et al., 2018): every sample blended with another of the same batch, ``lam * x + (1 - lam) *
    x[perm]`` with one ``lam ~ Beta(alpha, alpha)`` per batch. Returns the blend, ``lam`` and ``perm``."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(inputs.shape[0], device=inputs.device)
    return lam * inputs + (1 - lam) * inputs[perm], lam, perm


def training_loss(model, head, name: str, batch: dict, mixup_alpha: float = 0.0) -> torch.Tensor:
    """One batch's loss, with mixup when ``mixup_alpha`` > 0. The mixed loss is ``lam * loss(y) + (1 - lam) *
    loss(y[perm])``: each task's own loss (label smoothing included) needs no soft-target variant, and for
    cross-entropy and binary cross-entropy it equals the loss of the blended target. (timm's ``Mixup`` builds
    one-hot targets and needs an even batch, so it would bypass the task's loss.)"""
    if not mixup_alpha:
        return head.loss(model(batch["inputs"], modality=name), batch["labels"])
    inputs, lam, perm = mixup(batch["inputs"], mixup_alpha)
    outputs = model(inputs, modality=name)
    return lam * head.loss(outputs, batch["labels"]) + (1 - lam) * head.loss(outputs, batch["labels"][perm])


def fit(s: Session) -> None:
    """Train until ``total_steps``: validation every ``eval_every`` epochs, a checkpoint every ``checkpoint_every``
    batches and at the end of every epoch."""
    from tqdm.auto import tqdm

    acc, t, state = s.accelerator, s.cfg["train"], s.state
    heads = s.unwrapped.heads
    weights = {n: s.cfg["modalities"][n]["loss_weight"] for n in s.names}
    mixups = {n: s.cfg["modalities"][n]["mixup"] for n in s.names}
    lengths = s.lengths
    bar = tqdm(total=s.total_steps, initial=state["global_step"], disable=not (acc.is_main_process and t["progress"]),
               dynamic_ncols=True, desc="train")
    window = _Window(s.names, acc.device)
    s.t_start = time.time()

    def flush(step: int, epoch: int) -> None:
        """Read the window; stop on a non-finite loss; log the per-modality mean losses."""
        means, bad_step, rate = window.read(acc)
        if bad_step is not None:
            where = next(w for st, _, w in window.steps if st == bad_step)
            bar.close()
            acc.end_training()
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} ({where}); stopped before any checkpoint held its update. "
                f"The last good checkpoint is {runs.latest(s.out_dir)}; lower train.lr or enable train.clip_grad")
        lr = s.optimizer.param_groups[0]["lr"]
        for name, loss in means.items():
            state["history"].append({"kind": "train", "step": step, "epoch": epoch, "modality": name, "loss": loss,
                                     "samples_per_s": rate, "lr": lr})
            acc.log({f"train/{name}/loss": loss}, step=step)
        if means:
            acc.log({"train/lr": lr, "train/samples_per_s": rate}, step=step)
            bar.set_postfix(loss="/".join(f"{v:.4f}" for v in means.values()), samples_s=f"{rate:.1f}", lr=f"{lr:.2e}")
        window.reset()

    def save() -> None:
        flush(state["global_step"], state["epoch"])  # never checkpoint weights a NaN step has touched
        state["elapsed"] = s.elapsed_before + time.time() - s.t_start
        ckpt.save(acc, s.out_dir, state["global_step"], state, t["keep_checkpoints"])

    finished = state["global_step"] >= s.total_steps
    while not finished and state["epoch"] < t["epochs"]:
        epoch = state["epoch"]
        order = schedule(lengths, t["interleave"], s.cfg["seed"], epoch)
        done = Counter(order[:state["step_in_epoch"]])
        iters = {n: _passes(s, n, epoch, done[n]) for n in s.names}
        s.model.train()
        for pos in range(state["step_in_epoch"], len(order)):
            name = order[pos]
            batch = next(iters[name])
            with acc.accumulate(s.model):
                loss = training_loss(s.model, heads[name], name, batch, mixups[name]) * weights[name]
                acc.backward(loss)
                if acc.sync_gradients and t["clip_grad"]:
                    acc.clip_grad_norm_(s.model.parameters(), t["clip_grad"])
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                state["updates"] += 1
                s.scheduler.step_update(state["updates"])
                if s.ema is not None:
                    s.ema.update(s.unwrapped, step=state["updates"])
            state["global_step"] += 1
            state["step_in_epoch"] = pos + 1
            window.add(name, loss, state["global_step"],
                       f"epoch {epoch}, batch {pos} of the epoch, on a {name!r} batch", batch["inputs"].shape[0])
            bar.update(1)
            finished = state["global_step"] >= s.total_steps
            if state["global_step"] % t["log_every"] == 0:
                flush(state["global_step"], epoch)
            if state["global_step"] % t["checkpoint_every"] == 0 and not finished and pos + 1 < len(order):
                save()
            if finished:
                break
        if state["step_in_epoch"] == len(order):
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            if state["epoch"] % t["eval_every"] == 0 or state["epoch"] == t["epochs"]:
                _validate(s, bar)
        save()  # end of the epoch, or where max_steps stopped it
    bar.close()
    _check_replicas(s)


def _passes(s: Session, name: str, epoch: int, done: int):
    """The training batches of ``name`` in one epoch: ``repeat`` passes over its loader, pass ``k`` shuffled and
    augmented as loader epoch ``epoch * repeat + k`` (so every pass differs, and ``repeat: 1`` is the plain epoch),
    after the first ``done`` batches (a resumed epoch)."""
    loader, repeat = s.train_loaders[name], s.cfg["modalities"][name]["repeat"]
    first, skip = divmod(done, len(loader))
    for k in range(first, repeat):
        pass_epoch = epoch * repeat + k
        s.train_sets[name].set_epoch(pass_epoch)
        dl = s.accelerator.skip_first_batches(loader, skip) if skip else loader
        dl.set_epoch(pass_epoch)
        skip = 0
        yield from dl


def _validate(s: Session, bar) -> None:
    row = {"kind": "val", "epoch": s.state["epoch"], "step": s.state["global_step"]}
    heads = s.unwrapped.heads
    for n in s.names:
        metrics, _, _ = evaluate(s.accelerator, s.eval_model, heads[n], s.eval_loaders["validation"][n], n)
        row.update({f"{n}/{k}": v for k, v in metrics.items()})
    s.state["history"].append(row)
    s.accelerator.log({f"val/{k}": v for k, v in row.items() if "/" in k}, step=s.state["global_step"])
    if s.accelerator.is_main_process:
        bar.write(f"epoch {s.state['epoch']}: " + ", ".join(
            f"val {n} {_primary(s, n)}={row[f'{n}/{_primary(s, n)}']:.4g}" for n in s.names))


def _primary(s: Session, name: str) -> str:
    return s.unwrapped.heads[name].task.primary_metric


def _check_replicas(s: Session) -> None:
    """Every process must hold the same parameters after training (DDP's promise); raise if they diverged.

    Compares per-tensor sums and sums of squares in float64, exactly, across processes. (Buffers such as
    BatchNorm running statistics are per process by design and are not compared; FSDP shards the parameters,
    so there are no replicas to compare.)
    """
    acc = s.accelerator
    if acc.num_processes == 1 or _is_fsdp(acc):
        return
    params = [p.detach().double() for p in s.unwrapped.parameters()]
    fingerprint = torch.stack([torch.stack([p.sum(), p.pow(2).sum()]) for p in params]).reshape(1, -1)
    everyone = acc.gather(fingerprint.to(acc.device))
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError("model replicas diverged across processes (parameters differ after training)")


# ------------------------------------------------------------------------------------------------ evaluate, export
def final_evaluation(s: Session) -> dict:
    """Metrics of every modality on the validation and test splits, and on the extra evaluation splits of those
    that have them (the EMA weights when EMA is on)."""
    heads = s.unwrapped.heads
    results = {split: {n: evaluate(s.accelerator, s.eval_model, heads[n], loader, n)[0]
                       for n, loader in loaders.items()} for split, loaders in s.eval_loaders.items()}
    s.accelerator.log({f"{split}/{n}/{k}": v for split, r in results.items() for n, m in r.items()
                       for k, v in m.items()}, step=s.state["global_step"])
    return results


def _model_for_export(s: Session):
    """A plain (unwrapped, unsharded) CPU model with the trained weights, without deep-copying a wrapped model:
    the EMA copy when EMA is on, else a fresh model loaded from ``accelerator.get_state_dict`` (which gathers
    FSDP shards onto the main process). Collective: every process must call it; ``None`` off the main one."""
    from ..multimodal import MultiModalNet

    if s.ema is not None:
        return s.ema.module if s.accelerator.is_main_process else None
    weights = s.accelerator.get_state_dict(s.model)
    if not s.accelerator.is_main_process:
        return None
    u = s.unwrapped
    model = MultiModalNet(u.backbone_name, u.tasks, u.backbone_kwargs)
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, strict=True)
    return model


def not_learning_warnings(tasks: dict[str, TaskData], metrics: dict[str, dict],
                          baselines: dict[str, dict]) -> list[str]:
    """A warning line per task that did not learn, as its task judges against its baselines
    (:meth:`uniperc.tasks.Task.did_not_learn`: e.g. a top-1 no better than 1.2x chance, a forecast no better
    than persistence)."""
    out = []
    for name, d in tasks.items():
        if name not in metrics:
            continue
        reason = get_task(d.task).did_not_learn(metrics[name], baselines.get(name, {}))
        if reason is not None:
            out.append(f"warning: {name} did not learn: test {reason}")
    return out


def export_and_summarise(s: Session, results: dict) -> dict:
    """Deploy-form export, curves, ``metrics.json`` / ``history.json``, and the final line; returns the summary."""
    from ..baselines import compute as compute_baselines, describe
    from ..export import export

    acc, state, out_dir = s.accelerator, s.state, s.out_dir
    elapsed = s.elapsed_before + time.time() - s.t_start
    per_task = {n: compute_baselines(s.tasks[n], [split for split in results if n in results[split]])
                for n in s.names}
    baselines = {split: {n: per_task[n][split] for n in r} for split, r in results.items()}
    tasks = {n: {"task": d.task, "num_outputs": d.num_outputs} for n, d in s.tasks.items()}
    summary = {"output_dir": str(out_dir), "tasks": tasks, "metrics": results, "baselines": baselines,
               "history": state["history"],
               "steps": state["global_step"], "epochs_completed": state["epoch"], "train_seconds": elapsed,
               "checkpoint": str(runs.latest(out_dir)), "export_dir": str(out_dir / runs.EXPORT_DIR),
               "num_processes": acc.num_processes,
               "replicas_checked": acc.num_processes > 1 and not _is_fsdp(acc)}
    final = _model_for_export(s)
    if acc.is_main_process:
        export(final, out_dir / runs.EXPORT_DIR, extra={"train_config": s.cfg})
        plot_curves(state["history"], out_dir / "training_curves.png",
                    {n: (h.task.primary_metric, h.task.higher_is_better) for n, h in s.unwrapped.heads.items()})
        (out_dir / "metrics.json").write_text(json.dumps(
            {k: v for k, v in summary.items() if k != "history"}, indent=1))
        (out_dir / "history.json").write_text(json.dumps(state["history"]))
    acc.wait_for_everyone()
    acc.end_training()
    acc.print("final: " + "; ".join(
        f"test {n} {_primary(s, n)}={results['test'][n][_primary(s, n)]:.4g}"
        + s.unwrapped.heads[n].task.unit for n in s.names)
        + f" ({state['global_step']} steps, {elapsed:.0f} s training; model exported to {out_dir / runs.EXPORT_DIR})")
    for split in ["test"] + [sp for sp in results if sp not in ("validation", "test")]:
        for n in results[split]:
            acc.print(describe(n, split, results[split][n], baselines[split][n], s.tasks[n].task))
    for line in not_learning_warnings(s.tasks, results["test"], baselines["test"]):
        acc.print(line)
    return summary


def _eval_bs(section: dict) -> int:
    return section["eval_batch_size"] or 2 * section["batch_size"]
