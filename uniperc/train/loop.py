"""The training loop: ``run(config) -> {"metrics", "history", "output_dir", ...}``.

One loop for one modality or several: every batch comes from one modality (order from
:func:`~uniperc.train.data.schedule`), goes through that modality's stem, the shared stages and that
modality's head, and its task loss is back-propagated. Accelerate provides the devices, processes (DDP),
mixed precision, gradient accumulation, checkpoint state and trackers.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from .config import resolve
from .data import SeededAugment, load_task, make_loader, schedule
from .evaluation import evaluate
from .tracking import CSVTracker, flatten, plot_curves


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before applying that step (last checkpoint is intact)."""


def _accelerator(cfg: dict, num_modalities: int):
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs,
                                  GradientAccumulationPlugin, ProjectConfiguration)

    from accelerate.state import AcceleratorState, GradientState

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


def _backbone_kwargs(model_cfg: dict) -> dict:
    kwargs = dict(model_cfg["kwargs"])
    if model_cfg["mixer"] is not None:
        kwargs["mixer"] = model_cfg["mixer"]
    kwargs["drop_path_rate"] = model_cfg["drop_path_rate"]
    kwargs["drop_rate"] = model_cfg["drop_rate"]
    return kwargs


def build_model(cfg: dict, tasks: dict):
    """The :class:`~uniperc.multimodal.MultiModalNet` for a resolved config and loaded task data."""
    from ..multimodal import MultiModalNet

    specs = {name: {"task": d.task, "in_chans": d.in_chans, "num_outputs": d.num_outputs,
                    "output_names": d.output_names, "input_size": list(d.input_size),
                    "adapter_config": d.adapter_config,
                    "label_smoothing": cfg["modalities"][name]["label_smoothing"], "head": d.head,
                    "target_shape": d.target_shape and list(d.target_shape), "residual_channels": d.residual_channels}
             for name, d in tasks.items()}
    return MultiModalNet(cfg["model"]["backbone"], specs, _backbone_kwargs(cfg["model"]))


def run(config: dict, resume: bool | str = False) -> dict:
    """Train as ``config`` says (see :mod:`uniperc.train.config`); returns metrics, history and paths.

    ``resume``: ``True`` continues from the newest complete checkpoint in ``output_dir`` (a fresh start if
    there is none), a path continues from that checkpoint; ``False`` starts over (old checkpoints in
    ``output_dir`` are removed). Raises ``ValueError`` for invalid configuration before anything is trained,
    and :class:`NonFiniteLossError` if the loss becomes NaN/inf.
    """
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    import uniperc  # noqa: F401  (registers the variants in timm)

    from ..heads import PRIMARY_METRIC

    cfg = resolve(config)
    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    out_dir = Path(cfg["output_dir"])
    accelerator = _accelerator(cfg, len(cfg["modalities"]))
    if t["mixed_precision"] == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("train.mixed_precision 'fp16' needs a GPU; use 'bf16' on CPU")
    main = accelerator.is_main_process
    say = accelerator.print

    resume_from = None
    if resume:
        resume_from = ckpt.latest(out_dir) if resume is True else Path(resume)
        if resume is True and resume_from is None:
            say(f"no complete checkpoint in {out_dir}/checkpoints: starting from scratch")
    if resume_from is None and main:
        shutil.rmtree(ckpt.checkpoint_dir(out_dir), ignore_errors=True)
        (out_dir / "metrics.csv").unlink(missing_ok=True)  # the CSV tracker appends
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- data (main process generates demo sets first)
    set_seed(cfg["seed"])
    with accelerator.main_process_first():
        tasks = {name: load_task(name, section, cfg["seed"]) for name, section in cfg["modalities"].items()}
    for name, d in tasks.items():
        say(f"{name}: {d.task}, {d.num_outputs} outputs, input {d.in_chans}x{d.input_size[0]}x{d.input_size[1]}, "
            f"{len(d.splits['train'])}/{len(d.splits['validation'])}/{len(d.splits['test'])} train/val/test samples")
    train_sets = {n: SeededAugment(d.splits["train"], cfg["seed"]) for n, d in tasks.items()}
    train_loaders = {n: make_loader(ds, cfg["modalities"][n]["batch_size"], True, cfg["seed"], t["num_workers"])
                     for n, ds in train_sets.items()}
    eval_loaders = {split: {n: make_loader(d.splits[split], _eval_bs(cfg["modalities"][n]), False, cfg["seed"],
                                           t["num_workers"]) for n, d in tasks.items()}
                    for split in ("validation", "test")}

    # ---------------------------------------------------------------- model, optimiser, schedule
    set_seed(cfg["seed"])
    model = build_model(cfg, tasks)
    if main:
        (out_dir / "model_spec.json").write_text(json.dumps(
            {"backbone": model.backbone_name, "backbone_kwargs": model.backbone_kwargs, "tasks": model.tasks}, indent=1))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=t["lr"], weight_decay=t["weight_decay"],
                                    betas=tuple(t["betas"]))
    names = list(tasks)
    prepared = accelerator.prepare(model, optimizer, *train_loaders.values(),
                                   *eval_loaders["validation"].values(), *eval_loaders["test"].values())
    model, optimizer = prepared[:2]
    k = len(names)
    train_loaders = dict(zip(names, prepared[2:2 + k]))
    eval_loaders = {"validation": dict(zip(names, prepared[2 + k:2 + 2 * k])),
                    "test": dict(zip(names, prepared[2 + 2 * k:2 + 3 * k]))}
    lengths = {n: len(dl) for n, dl in train_loaders.items()}
    for n, count in lengths.items():
        if count == 0:
            raise ValueError(f"modalities.{n}.batch_size {cfg['modalities'][n]['batch_size']} is too large: the "
                             f"{len(tasks[n].splits['train'])} training samples give no batch on each of "
                             f"{accelerator.num_processes} process(es)")
    steps_per_epoch = sum(lengths.values())
    total_steps = t["epochs"] * steps_per_epoch
    if t["max_steps"] is not None:
        total_steps = min(total_steps, t["max_steps"])
    total_updates = max(1, total_steps // t["grad_accum"])
    warmup = t["warmup_steps"] if t["warmup_steps"] is not None else round(
        t["warmup_epochs"] * steps_per_epoch / t["grad_accum"])
    warmup = min(warmup, total_updates - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_updates - warmup), lr_min=t["min_lr"],
                                  warmup_t=warmup, warmup_lr_init=t["min_lr"], warmup_prefix=True, t_in_epochs=False)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if t["ema"]["enabled"]:
        ema = ModelEmaV3(unwrapped, decay=t["ema"]["decay"], use_warmup=t["ema"]["warmup"])
        accelerator.register_for_checkpointing(ema)
    heads = unwrapped.heads
    weights = {n: cfg["modalities"][n]["loss_weight"] for n in names}

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "updates": 0, "history": [], "elapsed": 0.0}
    if resume_from is not None:
        state = ckpt.load(accelerator, resume_from)
        say(f"resumed from {resume_from} (epoch {state['epoch']}, batch {state['step_in_epoch']} of that epoch, "
            f"step {state['global_step']})")
    accelerator.init_trackers("logs", config=flatten(cfg))

    n_params = sum(p.numel() for p in unwrapped.parameters())
    say(f"model: {cfg['model']['backbone']} {n_params / 1e6:.3f}M parameters, {accelerator.num_processes} process(es) "
        f"on {accelerator.device}, mixed precision {accelerator.mixed_precision}; {steps_per_epoch} batches/epoch, "
        f"{total_steps} steps, {total_updates} optimizer updates")

    def save_checkpoint():
        state["elapsed"] = elapsed_before + time.time() - t_start
        return ckpt.save(accelerator, out_dir, state["global_step"], state, t["keep_checkpoints"])

    bar = tqdm(total=total_steps, initial=state["global_step"], disable=not (main and t["progress"]),
               dynamic_ncols=True, desc="train")
    elapsed_before, t_start = state["elapsed"], time.time()
    window = {"loss": 0.0, "batches": 0, "samples": 0, "t0": time.time()}
    smooth = None
    finished = state["global_step"] >= total_steps
    while not finished and state["epoch"] < t["epochs"]:
        epoch = state["epoch"]
        order = schedule(lengths, t["interleave"], cfg["seed"], epoch)
        done = Counter(order[:state["step_in_epoch"]])
        iters = {}
        for n, dl in train_loaders.items():
            train_sets[n].set_epoch(epoch)
            dl = accelerator.skip_first_batches(dl, done[n]) if done[n] else dl
            dl.set_epoch(epoch)
            iters[n] = iter(dl)
        model.train()
        for pos in range(state["step_in_epoch"], len(order)):
            name = order[pos]
            batch = next(iters[name])
            with accelerator.accumulate(model):
                out = model(batch["inputs"], modality=name)
                loss = heads[name].loss(out, batch["labels"]) * weights[name]
                losses = accelerator.gather(loss.detach()[None])
                if not torch.isfinite(losses).all():
                    bar.close()
                    accelerator.end_training()
                    raise NonFiniteLossError(
                        f"non-finite loss ({losses.tolist()}) at step {state['global_step'] + 1} (epoch {epoch}, "
                        f"batch {pos} of the epoch) on a {name!r} batch; stopped without applying it. The last "
                        f"good checkpoint is {ckpt.latest(out_dir)}; lower train.lr or enable train.clip_grad")
                accelerator.backward(loss)
                if accelerator.sync_gradients and t["clip_grad"]:
                    accelerator.clip_grad_norm_(model.parameters(), t["clip_grad"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                state["updates"] += 1
                scheduler.step_update(state["updates"])
                if ema is not None:
                    ema.update(unwrapped, step=state["updates"])
            state["global_step"] += 1
            state["step_in_epoch"] = pos + 1
            value = losses.mean().item()
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            window["loss"] += value
            window["batches"] += 1
            window["samples"] += batch["inputs"].shape[0] * accelerator.num_processes
            rate = window["samples"] / max(time.time() - window["t0"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", samples_s=f"{rate:.1f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if state["global_step"] % t["log_every"] == 0:
                row = {"kind": "train", "step": state["global_step"], "epoch": epoch, "modality": name,
                       "loss": window["loss"] / window["batches"], "samples_per_s": rate,
                       "lr": optimizer.param_groups[0]["lr"]}
                state["history"].append(row)
                accelerator.log({f"train/{name}/loss": row["loss"], "train/lr": row["lr"],
                                 "train/samples_per_s": rate}, step=state["global_step"])
                window.update(loss=0.0, batches=0, samples=0, t0=time.time())
            finished = state["global_step"] >= total_steps
            if state["global_step"] % t["checkpoint_every"] == 0 and not finished and pos + 1 < len(order):
                save_checkpoint()
            if finished:
                break
        if state["step_in_epoch"] == len(order):
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            if state["epoch"] % t["eval_every"] == 0 or state["epoch"] == t["epochs"]:
                row = {"kind": "val", "epoch": state["epoch"], "step": state["global_step"]}
                eval_model = ema.module if ema is not None else model
                for n in names:
                    metrics, _, _ = evaluate(accelerator, eval_model, heads[n], eval_loaders["validation"][n], n)
                    row.update({f"{n}/{k}": v for k, v in metrics.items()})
                state["history"].append(row)
                accelerator.log({f"val/{k}": v for k, v in row.items() if "/" in k}, step=state["global_step"])
                if main:
                    bar.write(f"epoch {state['epoch']}: " + ", ".join(
                        f"val {n} {PRIMARY_METRIC[tasks[n].task][0]}={row[f'{n}/{PRIMARY_METRIC[tasks[n].task][0]}']:.4g}"
                        for n in names))
        save_checkpoint()  # end of the epoch, or where max_steps stopped it
    bar.close()
    elapsed = elapsed_before + time.time() - t_start
    _check_replicas(accelerator, unwrapped)

    # ---------------------------------------------------------------- final evaluation, export, summary
    eval_model = ema.module if ema is not None else model
    results = {split: {} for split in ("validation", "test")}
    for split in results:
        for n in names:
            metrics, _, _ = evaluate(accelerator, eval_model, heads[n], eval_loaders[split][n], n)
            results[split][n] = metrics
    accelerator.log({f"{split}/{n}/{k}": v for split, r in results.items() for n, m in r.items()
                     for k, v in m.items()}, step=state["global_step"])
    from ..baselines import compute as compute_baselines, describe

    per_task = {n: compute_baselines(tasks[n], results) for n in names}
    baselines = {split: {n: per_task[n][split] for n in names} for split in results}
    summary = {"output_dir": str(out_dir), "metrics": results, "baselines": baselines, "history": state["history"],
               "steps": state["global_step"], "epochs_completed": state["epoch"], "train_seconds": elapsed,
               "checkpoint": str(ckpt.latest(out_dir)), "export_dir": str(out_dir / "model"),
               "num_processes": accelerator.num_processes, "replicas_checked": accelerator.num_processes > 1}
    if main:
        from ..export import export

        final = copy.deepcopy(ema.module if ema is not None else unwrapped)
        export(final, out_dir / "model", extra={"train_config": cfg})
        plot_curves(state["history"], out_dir / "training_curves.png",
                    {n: PRIMARY_METRIC[d.task] for n, d in tasks.items()})
        (out_dir / "metrics.json").write_text(json.dumps(
            {k: v for k, v in summary.items() if k != "history"}, indent=1))
        (out_dir / "history.json").write_text(json.dumps(state["history"]))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    say("final: " + "; ".join(
        f"test {n} {PRIMARY_METRIC[tasks[n].task][0]}={results['test'][n][PRIMARY_METRIC[tasks[n].task][0]]:.4g}"
        + ("%" if tasks[n].task != "regression" else "") for n in names)
        + f" ({state['global_step']} steps, {elapsed:.0f} s training; model exported to {out_dir / 'model'})")
    for n in names:
        say(describe(n, "test", results["test"][n], baselines["test"][n]))
    return summary


def _check_replicas(accelerator, model) -> None:
    """Every process must hold the same parameters after training (DDP's promise); raise if they diverged.

    Compares per-tensor sums and sums of squares in float64, exactly, across processes. (Buffers such as
    BatchNorm running statistics are per process by design and are not compared.)
    """
    if accelerator.num_processes == 1:
        return
    params = [p.detach().double() for p in model.parameters()]
    fingerprint = torch.stack([torch.stack([p.sum(), p.pow(2).sum()]) for p in params]).reshape(1, -1)
    everyone = accelerator.gather(fingerprint.to(accelerator.device))
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError("model replicas diverged across processes (parameters differ after training)")


def _eval_bs(section: dict) -> int:
    return section["eval_batch_size"] or 2 * section["batch_size"]

