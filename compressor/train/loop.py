"""One training loop for fine-tuning and one-cycle training, with named hook points for pruning methods.

DDP-aware (torchrun: gloo on CPU, nccl on CUDA; rank 0 writes), resumable per epoch with the same result as
an uninterrupted run: every epoch re-seeds the data order and augmentation from (seed, epoch).
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from compressor.errors import ModelLoadError, RecipeError, TrainingError
from compressor.models.layers import set_memory_format
from compressor.progress import info, is_main_process, track
from compressor.ranks import compute_device, init_process_group
from compressor.prune.context import PruneContext
from compressor.pruner import Pruner
from compressor.prune.methods.base import PruningMethod
from compressor.train.memory_format import channels_last_candidate, training_channels_last
from compressor.train.config import DataConfig, FinetuneConfig, SchedulerConfig
from compressor.train.data import make_loader, subset_indices
from compressor.tasks.base import Task
from compressor import rundir


# ---------------------------------------------------------------------------------------------- distributed
def all_gather(obj: Any, world: int = 0) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] without a process group or when the caller runs alone."""
    import torch.distributed as dist

    if world != 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def all_reduce_sum(tensor: torch.Tensor, world: int = 0) -> torch.Tensor:
    """Sum a tensor over ranks (identity without a process group, or when the caller runs alone: world 1)."""
    import torch.distributed as dist

    if world != 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_buffers(model: nn.Module, world: int = 0) -> None:
    """Average floating-point buffers (BN running statistics) over ranks so every rank holds the same model."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(cfg: SchedulerConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after `step` completed optimizer steps."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "multistep":
        return cfg.gamma ** sum(step / max(1, total_steps) >= m for m in cfg.milestones)
    if cfg.kind == "onecycle":
        peak = 0.3
        if progress < peak:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * progress / peak))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (progress - peak) / (1 - peak)))
    return 1.0


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and norm parameters (1-d tensors)."""
    opt = cfg.optimizer
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opt.kind == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas))


# ---------------------------------------------------------------------------------------------- context
@dataclass(kw_only=True)
class TrainContext(PruneContext):
    """What hooks see and may change in `fit`: the PruneContext plus the fine-tuning settings, the rank, the
    memory format and `module`, what runs forward (the bare model, or its DDP wrapper)."""

    cfg: FinetuneConfig
    rank: int = 0
    world: int = 1
    module: Optional[nn.Module] = None
    channels_last: bool = False
    memory_formats: dict[str, bool] = field(default_factory=dict)  # structure -> channels-last (memory_format.py)

    def prepare(self) -> None:
        """Before training and after loading a checkpoint: a new optimizer over the current parameters (the
        checkpoint's state loads into it), then follow(). The LR schedule is a function of ctx.step."""
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.follow()

    def follow(self) -> None:
        """The loop follows the current structure: its memory format (per structure: guarded, then measured), the
        learning rate of ctx.step, DDP re-wrapped. After a removal the Pruner has already carried the optimizer's
        state over to the new parameters (prune/lineage.py), so momentum and Adam moments of kept channels stay."""
        self.channels_last = training_channels_last(self)
        set_memory_format(self.model, self.channels_last)  # 4-D tensors only (a Conv3d's 5-D weight stays)
        self.set_lr()
        self.module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def set_lr(self) -> float:
        factor = lr_factor(self.cfg.scheduler, self.step, self.total_steps, self.steps_per_epoch)
        lr = self.cfg.optimizer.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu",
             rank: int = 0, world: int = 1, description: str = "eval",
             metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
             task: Optional[Task] = None) -> dict[str, float]:
    """The task's metrics over the dataset (classification, the default: top-1, top-5 (percent) and mean
    cross-entropy); sharded over ranks under DDP. The model runs on `device` (under torchrun `cuda` is the rank's
    own GPU) and is returned to the device it came on. `metric` (the Python API's metric(outputs, targets) ->
    float, a batch mean): its mean over the samples, each batch weighted by its size, under "metric"."""
    from compressor.train.metrics import evaluate_batches  # the accumulation evaluate_onnx shares

    device = compute_device(device)
    home = _model_device(model)
    model.to(device)
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 4 and channels_last_candidate(model, device):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return model(inputs.to(device))

    try:
        task = task or default_task()
        return evaluate_batches(predict, make_loader(shard, batch_size, shuffle=False, workers=0),
                                evaluator=task.evaluator(model=model, metric=metric),
                                gather=lambda obj: all_gather(obj, world), description=description)
    finally:
        model.train(was_training)
        model.to(home)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a module with neither)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- loss
def default_task(cfg: Optional[FinetuneConfig] = None) -> Task:
    """Classification (cross-entropy with finetune.label_smoothing, top-1): the task when none is given."""
    from compressor.tasks.classification import Classification

    return Classification(0, label_smoothing=cfg.label_smoothing if cfg is not None else 0.0)


def make_loss(cfg: FinetuneConfig, teacher: Optional[nn.Module],
              criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
              task: Optional[Task] = None):
    """The task's loss (classification: cross-entropy with label smoothing; detection: the model's own; ...), or
    the user's `criterion(outputs, targets) -> scalar tensor` (the Python API's compress(loss=...);
    finetune.label_smoothing does not apply to it), blended with the task's distillation from `teacher` when
    enabled."""
    task = task or default_task(cfg)

    def loss_fn(module: nn.Module, inputs: torch.Tensor, targets: Any) -> torch.Tensor:
        outputs = module(inputs)
        if criterion is None:
            loss = task.criterion(outputs, targets, getattr(module, "module", module))
        else:
            loss = _checked_loss(criterion(outputs, targets), criterion)
        if teacher is not None and cfg.distill.enabled:
            soft = task.teacher_outputs(teacher, inputs)
            loss = (1 - cfg.distill.alpha) * loss + cfg.distill.alpha * task.distill(outputs, soft,
                                                                                     cfg.distill.temperature)
        return loss

    return loss_fn


def _checked_loss(loss: Any, criterion: Callable[..., Any]) -> torch.Tensor:
    """The user loss's value, or TrainingError naming what it returned instead of a scalar tensor."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
        return loss.reshape(())
    got = (f"a {'constant ' if isinstance(loss, torch.Tensor) and not loss.requires_grad else ''}tensor of shape "
           f"{list(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}")
    name = getattr(criterion, "__qualname__", type(criterion).__name__)
    raise TrainingError(f"the loss {name}(outputs, targets) returned {got}; training needs one scalar tensor that "
                        "depends on the outputs (so that it has a gradient).",
                        hint="Return e.g. a mean over the batch (reduction='mean'), computed from the outputs with "
                             "torch operations.")


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, ctx: TrainContext, method: PruningMethod,
                    scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Everything a resume needs to continue as if uninterrupted: weights, optimizer, the method's (and its host's)
    state, and the loss scaler's scale and growth tracker ({} when the scaler is disabled)."""
    if not is_main_process():
        return
    rundir.save_torch({"epoch": ctx.epoch, "step": ctx.step, "model": ctx.model.state_dict(),
                       "optimizer": ctx.optimizer.state_dict(), "method": method.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else {},
                       "history": ctx.history, "memory_formats": ctx.memory_formats}, path)


def load_checkpoint(path: Path, ctx: TrainContext, method: PruningMethod,
                    scaler: Optional[torch.amp.GradScaler] = None) -> None:
    from compressor.models.slim import conform_to_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and how to recover
        raise ModelLoadError(f"cannot resume from {path}: {exc}.", hint="Delete it to start over.") from exc
    conform_to_state_dict(ctx.model, state["model"])
    ctx.model.load_state_dict(state["model"])
    ctx.model.to(ctx.device)
    ctx.epoch, ctx.step, ctx.history = state["epoch"] + 1, state["step"], state["history"]
    method.load_state_dict(state["method"])
    ctx.memory_formats.update(state.get("memory_formats", {}))  # train in the format the interrupted run chose
    ctx.prepare()
    ctx.optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):  # a checkpoint of a run without a scaler (or older) has none
        scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    history: list[dict[str, Any]]
    final: dict[str, float]
    seconds: float
    resumed_from: Optional[int] = None
    bn_recalibration: Optional[dict[str, Any]] = None  # {layers, batches, samples} when statistics were re-estimated


def _seed_epoch(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: FinetuneConfig, data_cfg: DataConfig, *,
        method: Optional[PruningMethod] = None, teacher: Optional[nn.Module] = None,
        loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
        checkpoint: Optional[Path] = None, resume: bool = False, device: str = "cpu",
        evaluate_every_epoch: bool = True, alone: bool = False, task: Optional[Task] = None) -> FitResult:
    """Train `model` in place for cfg.epochs, calling the method's hooks; returns the per-epoch history.
    `loss`: the user's loss(outputs, targets) -> scalar tensor instead of cross-entropy (see make_loss); `metric`:
    the user's metric(outputs, targets) -> float, evaluated with top-1 each epoch (history: val_metric).
    `alone`: this process trains by itself even under torchrun (QAT runs on the main process after the DDP stages:
    no collective may wait for ranks that have finished). `task`: what the loss and the metrics are
    (compressor/tasks; classification when None)."""
    task = task or default_task(cfg)
    method = method or PruningMethod()
    rank, world = (0, 1) if alone else init_process_group(device)
    dev = compute_device(device)
    model.to(dev).train()
    if teacher is not None:
        teacher.to(dev).eval()
    torch.manual_seed(cfg.seed)
    check_method_schedule(method, len(train_set), cfg, data_cfg, world=world)
    steps_per_epoch = _batches_per_epoch(len(train_set), data_cfg.batch_size, world)
    ctx = TrainContext(model=model, cfg=cfg, device=dev, steps_per_epoch=steps_per_epoch,
                       total_steps=steps_per_epoch * cfg.epochs, rank=rank, world=world,
                       loss_fn=make_loss(cfg, teacher, loss, task))
    ctx.calibration = lambda n: _calibration_batches(train_set, data_cfg.batch_size, n)
    ctx.prepare()
    # the method runs through the same Pruner as a user's loop: after a removal it carries the optimizer's state
    # over to the new parameters, and the loop follows (memory format, learning rate, DDP wrapper)
    pruner = Pruner.driving(method, ctx, on_structure_change=lambda _: ctx.follow())
    amp_dtype = autocast_dtype(cfg, dev)
    scaler = _make_scaler(amp_dtype)
    resumed_from = None
    if resume and checkpoint is not None and checkpoint.is_file():
        load_checkpoint(checkpoint, ctx, method, scaler)
        resumed_from = ctx.epoch
        info(f"resumed after epoch {ctx.epoch - 1} (step {ctx.step})")
    pruner.start()
    start = time.perf_counter()
    eval_batch = data_cfg.eval_batch_size or max(data_cfg.batch_size, 256)
    while ctx.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        torch.manual_seed(_seed_epoch(cfg.seed, ctx.epoch))
        loader = make_loader(train_set, data_cfg.batch_size, shuffle=True, workers=data_cfg.workers,
                             seed=_seed_epoch(cfg.seed, ctx.epoch), rank=rank, world=world)
        if world > 1:
            loader.sampler.set_epoch(ctx.epoch)
        train_stats = _train_epoch(ctx, loader, pruner, scaler, amp_dtype)
        average_buffers(model, world)
        ctx.metrics = dict(train_stats)
        if evaluate_every_epoch or ctx.epoch == cfg.epochs - 1:
            val = evaluate(model, val_set, batch_size=eval_batch, device=dev, rank=rank, world=world,
                           description=f"epoch {ctx.epoch + 1} eval", metric=metric, task=task)
            ctx.metrics.update({f"val_{k}": v for k, v in val.items() if k != "count"})
        pruner.epoch_end(ctx.metrics)
        ctx.metrics.update({"epoch": ctx.epoch + 1, "seconds": time.perf_counter() - epoch_start,
                            "params": sum(p.numel() for p in model.parameters())})
        ctx.history.append(dict(ctx.metrics))
        _log_epoch(ctx, task)
        if checkpoint is not None:
            save_checkpoint(checkpoint, ctx, method, scaler)
        ctx.epoch += 1
    bn = cfg.bn_recalibration  # the batch-norm statistics re-estimated after the last change, the same on every rank
    pruner.finalize(recalibrate=ctx.calibration if bn.enabled else None, batches=bn.batches)
    final = ctx.history[-1] if ctx.history else {}
    return FitResult(history=ctx.history, final=final, seconds=time.perf_counter() - start, resumed_from=resumed_from,
                     bn_recalibration=pruner.bn_recalibration)


def check_method_schedule(method: PruningMethod, train_size: int, cfg: FinetuneConfig, data_cfg: DataConfig, *,
                          world: Optional[int] = None) -> list[str]:
    """The method's schedule warnings for this training budget (`PruningMethod.check_schedule`), each printed once
    as "warning: ..."; raises RecipeError (exit 2) instead when the method's spec is strict (spec.strict_schedule,
    the recipe's gates.strict_schedule).

    `compress` calls it before `fit` to record the warnings in the report's notes; `fit` calls it again and stays
    quiet when the same method was already checked for the same budget (a fresh process after --resume warns again).
    """
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = _batches_per_epoch(train_size, data_cfg.batch_size, world)
    budget = (steps_per_epoch * cfg.epochs, steps_per_epoch)
    checked = getattr(method, "_checked_schedule", None)
    if checked is not None and checked[0] == budget:
        return list(checked[1])
    warnings = list(method.check_schedule(*budget))
    if warnings and getattr(method.spec, "strict_schedule", False):
        raise RecipeError(f"the {method.name} schedule does not fit the training budget ({budget[0]} optimizer "
                          f"steps, {budget[1]} per epoch):\n  " + "\n  ".join(warnings),
                          hint="Change the fields named above, or set gates.strict_schedule: false to train anyway.")
    for warning in warnings:
        info(f"warning: {warning}")
    method._checked_schedule = (budget, warnings)
    return warnings


def autocast_dtype(cfg: FinetuneConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of finetune.amp: float16 (with a gradient scaler) on CUDA, bfloat16 (no scaler: its
    exponent range is float32's) on CPU, None when AMP is off or the device has no AMP mode here."""
    if not cfg.amp:
        return None
    return {"cuda": torch.float16, "cpu": torch.bfloat16}.get(device.type)


def _make_scaler(amp_dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A loss scaler for float16 autocast (CUDA); a disabled one (a pass-through) otherwise."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def _calibration_batches(train_set: Dataset, batch_size: int, n: int):
    """n unshuffled batches of a seeded random subset of the training set (not its first n batches: a class-sorted
    dataset would give one class); the same batches on every rank and in every run."""
    chosen = Subset(train_set, subset_indices(len(train_set), n * batch_size))
    return itertools.islice(make_loader(chosen, batch_size, shuffle=False, workers=0), n)


def _grads_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (one device sync)."""
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _batches_per_epoch(size: int, batch_size: int, world: int) -> int:
    if world > 1:
        return max(1, (size // world) // batch_size + (1 if (size // world) % batch_size else 0))
    return max(1, math.ceil(size / batch_size))


def _train_epoch(ctx: TrainContext, loader, pruner: Pruner, scaler: torch.amp.GradScaler,
                 amp_dtype: Optional[torch.dtype]) -> dict[str, float]:
    """One epoch. Under a (float16) gradient scaler the gradients are unscaled before the hooks, so methods and
    clipping see true gradients; on steps whose gradients overflowed the hooks are skipped (nothing is observed)
    and the scaler skips the optimizer step. Without a scaler the order is: backward, hooks, clip, step."""
    total_loss, seen = 0.0, 0
    with track(f"epoch {ctx.epoch + 1}/{ctx.cfg.epochs}", len(loader)) as bar:
        for inputs, targets in loader:
            if ctx.channels_last and inputs.ndim == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            ctx.inputs, ctx.targets = inputs.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
            ctx.set_lr()
            ctx.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=ctx.device.type, dtype=amp_dtype or torch.float16,
                                enabled=amp_dtype is not None):
                ctx.loss = ctx.loss_fn(ctx.module, ctx.inputs, ctx.targets)
            if not torch.isfinite(ctx.loss):
                raise TrainingError(
                    f"the training loss became {ctx.loss.item()} at epoch {ctx.epoch + 1}, step {ctx.step + 1}.",
                    hint="Lower finetune.optimizer.lr, set finetune.grad_clip (e.g. 5.0), or check the data "
                    "normalisation.",
                )
            scaler.scale(ctx.loss).backward()
            finite = True
            if scaler.is_enabled():
                scaler.unscale_(ctx.optimizer)  # hooks (gradient scorers, regularisers) and clipping see true gradients
                finite = _grads_finite(ctx.model)  # an overflow: the scaler skips this step, the hooks skip it too
            if finite:
                pruner.after_backward(ctx.loss)
            if ctx.cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.cfg.grad_clip)
            # a removal in the hook remapped the same optimizer (its gradients came along, already unscaled)
            scaler.step(ctx.optimizer)
            scaler.update()
            pruner.after_step()
            total_loss += ctx.loss.item() * len(targets)
            seen += len(targets)
            bar.advance(status=f"loss {total_loss / seen:.4f}")
    sums = all_reduce_sum(torch.tensor([total_loss, float(seen)], dtype=torch.float64), ctx.world).tolist()
    return {"train_loss": sums[0] / max(sums[1], 1.0), "lr": ctx.optimizer.param_groups[0]["lr"]}


def _log_epoch(ctx: TrainContext, task: Task) -> None:
    m = ctx.metrics
    val = "" if f"val_{task.primary}" not in m else " val " + task.summary(
        {k[4:]: v for k, v in m.items() if k.startswith("val_")})
    info(f"epoch {m['epoch']}/{ctx.cfg.epochs}: train loss {m['train_loss']:.4f}{val} lr {m['lr']:.5f} "
         f"({m['seconds']:.1f}s)")


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense model for distillation."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
