"""The memory format a model trains in on the CPU: contiguous (NCHW) or channels-last (NHWC), chosen again after
every structural change.

oneDNN runs convolutions several times faster on channels-last tensors at the widths networks are built with,
multiples of the CPU's channel block (8 floats with AVX2, 16 with AVX-512: the block ONNX Runtime's NCHWc layout
uses too, deploy/hardware.py). Pruning makes other widths, and there channels-last can be far slower: the
Fashion-MNIST sample pruned to widths 4 / 7 / 13 trained at 0.115 s per batch of 128 in contiguous memory and took
more than 4 minutes for one batch in channels-last (oneDNN's backward on odd, tiny channel counts; issue 31); on
a shared 2-core AVX2 EPYC, 2.8 s against 1.2 s (one step each, under load).

So the choice is (finetune.memory_format: auto; `contiguous` skips it and always trains NCHW)
1. contiguous off the CPU, without a Conv2d, where oneDNN's channels-last backward crashes
   (onednn_channels_last_safe), or where a conv's output width is not a multiple of the channel block
   (`channels_last_candidate`, the cheap guard; evaluation follows it too);
2. otherwise measured: one training forward + backward on a training batch in each format, on a copy of the
   model, then REPS more of each, interleaved, and channels-last is kept where its fastest step is faster
   (`pick_format`). A first channels-last step more than SLOWER_STOP times the first contiguous one ends the
   timing (contiguous).

A decision is kept per structure: in the TrainContext (saved in the checkpoint, so --resume trains in the format the
interrupted run used) and for the process (runs of the same structure in one process train alike); under DDP rank 0
measures and every rank adopts its choice (the ranks' gradient buckets must have the same strides).
"""
from __future__ import annotations

import copy
import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from compressor.models.layers import set_memory_format
from compressor.progress import info

if TYPE_CHECKING:
    from compressor.train.loop import TrainContext

SLOWER_STOP = 3.0  # a first channels-last step this many times the contiguous one ends the timing
REPS = 1  # steps per format after the first (which also pays for oneDNN's kernel creation)
_DECIDED: dict[str, bool] = {}  # structure key -> channels-last, for this process


def channel_block() -> int:
    """The CPU's channel block (oneDNN's nChw8c / nChw16c blocking follows the same instruction sets as MLAS)."""
    from compressor.deploy.hardware import ort_cpu_block

    return ort_cpu_block()


def off_block_convs(model: nn.Module, block: int) -> list[str]:
    """Names of the Conv2d layers whose output width is not a multiple of `block` (the network's input channels
    do not count: they are no conv's output)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels % block]


def onednn_channels_last_safe(model: nn.Module) -> bool:
    """False where torch 2.14's oneDNN corrupts the heap: the backward of a channels-last strided 1x1 convolution
    with fewer than 8 input channels on a single intra-op thread ("double free or corruption", measured with
    OMP_NUM_THREADS=1; 8+ input channels or 2 threads are fine). Pruning can create such a layer (a ResNet
    shortcut fed by a 4-channel stage), so this is checked again after every structural change."""
    if torch.get_num_threads() > 1:
        return True
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8
                   for m in model.modules())


def channels_last_candidate(model: nn.Module, device: torch.device) -> bool:
    """Whether channels-last may be faster here: a CPU, a Conv2d, no oneDNN crash shape, and every conv's output
    width on the channel block. Evaluation uses it as it is; training measures where it holds."""
    return (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and onednn_channels_last_safe(model) and not off_block_convs(model, channel_block()))


def pick_format(step: Callable[[bool], float], *, reps: int = REPS,
                slower_stop: float = SLOWER_STOP) -> tuple[bool, dict[str, Any]]:
    """Whether to train in channels-last, from `step(channels_last) -> seconds` (one forward + backward): a first
    step in each format, and when channels-last's is within `slower_stop` times contiguous's, `reps` more of
    each, interleaved; channels-last where its fastest step beats contiguous's. Returns the choice and
    {contiguous: [s...], channels_last: [s...], stopped: bool}."""
    times: dict[str, Any] = {"contiguous": [step(False)], "channels_last": [step(True)], "stopped": False}
    if times["channels_last"][0] > slower_stop * times["contiguous"][0]:
        times["stopped"] = True
        return False, times
    for _ in range(reps):
        times["contiguous"].append(step(False))
        times["channels_last"].append(step(True))
    return min(times["channels_last"]) < min(times["contiguous"]), times


def time_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
              loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], channels_last: bool,
              amp_dtype: Optional[torch.dtype] = None) -> float:
    """Seconds of one forward + backward of `model` in the given format (under autocast with `amp_dtype`). The model
    is left in that format with new gradients (and, in training mode, batch-norm statistics): time a copy."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    set_memory_format(model, channels_last).zero_grad(set_to_none=True)  # 4-D tensors only (models/layers.py)
    x = inputs.contiguous(memory_format=fmt) if inputs.ndim == 4 else inputs  # as the training loop passes it
    start = time.perf_counter()
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss = loss_fn(model, x, targets)
    loss.backward()
    return time.perf_counter() - start


def structure_key(model: nn.Module, inputs: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> str:
    """What a decision depends on: every parameter's shape, the batch's shape, the threads and the AMP dtype."""
    parts = [tuple(p.shape) for p in model.parameters()] + [tuple(inputs.shape), torch.get_num_threads(), str(amp_dtype)]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def training_channels_last(ctx: "TrainContext") -> bool:
    """The format ctx.model trains in now (see the module docstring); the same on every rank."""
    if ctx.world > 1:
        from compressor.ranks import main_then_share

        return main_then_share(lambda: _decide(ctx))
    return _decide(ctx)


def _decide(ctx: "TrainContext") -> bool:
    from compressor.train.loop import autocast_dtype

    model = ctx.model
    if ctx.cfg.memory_format == "contiguous" or not channels_last_candidate(model, ctx.device):
        return False
    with torch.random.fork_rng(devices=[]):  # the batch's loader and dropout draw from it: training's stream stays
        return _measured(ctx, model, autocast_dtype(ctx.cfg, ctx.device))


def _measured(ctx: "TrainContext", model: nn.Module, amp: Optional[torch.dtype]) -> bool:
    batch = _probe_batch(ctx)
    if batch is None:  # no training batch to time: the guard alone
        return True
    inputs, targets = batch[0].to(ctx.device), batch[1].to(ctx.device)
    key = structure_key(model, inputs, amp)
    if key not in ctx.memory_formats:
        if key not in _DECIDED:
            probe = copy.deepcopy(model).train()  # its statistics, gradients and QAT observers change, not the model's
            choice, times = pick_format(lambda cl: time_step(probe, inputs, targets, ctx.loss_fn, cl, amp))
            del probe
            _DECIDED[key] = choice
            info(f"training memory format: {'channels-last' if choice else 'contiguous'} (one step of "
                 f"{len(inputs)}: channels-last {_seconds(times['channels_last'])}, contiguous "
                 f"{_seconds(times['contiguous'])}{'; stopped, channels-last was far slower' if times['stopped'] else ''})")
        ctx.memory_formats[key] = _DECIDED[key]
    return ctx.memory_formats[key]


def _probe_batch(ctx: "TrainContext") -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A training batch of the real input shape: the first calibration batch, else the last batch trained on."""
    if ctx.calibration is not None:
        batch = next(iter(ctx.calibration(1)), None)
        if batch is not None:
            return batch[0], batch[1]
    if ctx.inputs is not None and ctx.targets is not None:
        return ctx.inputs, ctx.targets
    return None


def _seconds(values: list[float]) -> str:
    return "/".join(f"{v:.3f}" for v in values) + " s"
