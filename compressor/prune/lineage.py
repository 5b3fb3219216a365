"""Optimizer state across a structural change: which new Parameter holds which slice of which old one.

A removal replaces every Parameter it shrinks by a new one (torch-pruning's handlers all go through
`BasePruningFunc._prune_parameter_and_grad`, compressor's head and embedding removal through
`models.attention.keep_index`, a MultiheadAttention that loses heads is rebuilt by `replace_mha`). While a `Lineage`
records, each replacement is kept as (old, new, dim, kept indices); `remap_optimizer` then points the optimizer's
parameter groups at the new Parameters and index-selects the state tensors shaped like a parameter (momentum,
Adam's moments, ...) to the kept slices, so training continues as if the removed channels had never existed.

What it covers, torch-pruning 1.6: every handler of `torch_pruning.pruner.function` (Conv, depthwise Conv, Linear,
BatchNorm, LayerNorm, GroupNorm, InstanceNorm, PReLU, Embedding, LSTM, MultiheadAttention, bare nn.Parameter through
`dependency.group`) replaces parameters only through `_prune_parameter_and_grad`; MultiheadAttention's in_proj and
out_proj weights are replaced twice (rows, then columns), which composes as a chain. A customized pruner that
overrides that method or builds Parameters itself is not seen: its parameters are found by name when the recording
was given the model (their state is reset and counted), otherwise their state is dropped and counted.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

_ACTIVE: list["Lineage"] = []  # the recording lineages, innermost last
_LOCK = threading.RLock()
_PATCHED: Optional[tuple[type, object]] = None  # (BasePruningFunc, its own _prune_parameter_and_grad), once patched


@dataclass(frozen=True, eq=False)
class _Step:
    old: torch.Tensor
    new: torch.Tensor
    dim: int
    index: Optional[torch.Tensor]  # kept indices along dim (CPU, long); None: the same values (a copy)

    def apply(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """`tensor` (shaped like old) cut like new; None where it is not shaped like old."""
        if tensor.shape != self.old.shape:
            return None
        if self.index is None:
            return tensor
        return tensor.index_select(self.dim, self.index.to(tensor.device))


def record_replacement(old: torch.Tensor, new: torch.Tensor, dim: int,
                       keep_idxs: Union[Sequence[int], torch.Tensor, None]) -> None:
    """Report that `new` replaces `old` and holds its slices `keep_idxs` along `dim` (None: all of it, as a copy)
    to every recording Lineage; nothing happens when none records."""
    if not _ACTIVE or old is new:
        return
    index = None
    if keep_idxs is not None:
        index = torch.as_tensor(keep_idxs, dtype=torch.long).detach().flatten().cpu().clone()
        dim = dim % max(old.dim(), 1)
    step = _Step(old, new, dim, index)
    for lineage in dict.fromkeys(_ACTIVE):  # each once, also a lineage recording inside itself
        lineage._steps.setdefault(id(old), []).append(step)


def _recording_prune(self, weight, keep_idxs, pruning_dim):
    """torch-pruning's _prune_parameter_and_grad, reported to the recording lineages."""
    new = _PATCHED[1](self, weight, keep_idxs, pruning_dim)
    record_replacement(weight, new, pruning_dim, keep_idxs)
    return new


def _install() -> None:
    global _PATCHED
    from torch_pruning.pruner.function import BasePruningFunc

    _PATCHED = (BasePruningFunc, BasePruningFunc.__dict__["_prune_parameter_and_grad"])
    BasePruningFunc._prune_parameter_and_grad = _recording_prune


def _uninstall() -> None:  # _PATCHED stays: a call that looked the patch up just before still finds the original
    owner, original = _PATCHED
    owner._prune_parameter_and_grad = original


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers (the same Parameters)."""
    while True:
        inner = getattr(model, "module", None) if isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class Lineage:
    """Records parameter replacements while `recording()` and carries an optimizer across them (`remap_optimizer`).

    Recording is process-wide: torch-pruning's function is patched while any Lineage records (restored when the
    last one stops, also on an exception), and every recording Lineage, nested ones included, sees every
    replacement made meanwhile, from any thread."""

    def __init__(self) -> None:
        self._steps: dict[int, list[_Step]] = {}  # id(old) -> the steps that replaced it
        self._names: Optional[dict[int, tuple[str, torch.Tensor]]] = None  # id(param) -> its name, before

    def __len__(self) -> int:
        return sum(len(steps) for steps in self._steps.values())

    @contextlib.contextmanager
    def recording(self, model: Optional[nn.Module] = None) -> Iterator["Lineage"]:
        """Record every replacement made inside the block. With `model`, its parameter names are remembered (the
        first time since the last remap) so that a parameter replaced by a path that does not report is found."""
        if model is not None and self._names is None:
            self._names = {id(p): (name, p) for name, p in unwrap(model).named_parameters()}
        with _LOCK:
            if not _ACTIVE:
                _install()
            _ACTIVE.append(self)
        try:
            yield self
        finally:
            with _LOCK:
                del _ACTIVE[len(_ACTIVE) - 1 - _ACTIVE[::-1].index(self)]
                if not _ACTIVE:
                    _uninstall()

    def clear(self) -> None:
        """Forget the records and the remembered names."""
        self._steps.clear()
        self._names = None

    def _chains(self, param: torch.Tensor, live: dict[int, torch.Tensor], seen: frozenset = frozenset()
                ) -> list[tuple[torch.Tensor, list[_Step]]]:
        """(parameter in the model, steps from `param` to it) for every end of `param`'s records still in use."""
        found = [(param, [])] if id(param) in live else []
        for step in self._steps.get(id(param), []):
            if id(step.new) not in seen:
                found += [(end, [step] + rest) for end, rest in self._chains(step.new, live, seen | {id(param)})]
        return found

    def remap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, clear: bool = True
                        ) -> dict[str, int]:
        """Point `optimizer` at `model`'s Parameters after the recorded replacements, in place.

        Each group keeps its hyper-parameters and its order: a replaced parameter takes the place of the old one
        (a parameter whose replacements ended in two places, a tied weight pruned twice, takes both). Its state
        tensors shaped like the old parameter are index-selected to the kept slices, along every step of its chain,
        on their own device; scalar state (Adam's step) is kept. A parameter no longer in `model` is dropped with
        its state. A parameter replaced without a record (found by name when the recording had the model) and
        one whose state has a tensor of another shape get an empty state. Returns the counts of remapped,
        dropped and reset parameters; the records are cleared unless `clear` is False."""
        model = unwrap(model)
        named = dict(model.named_parameters())
        live = {id(p): p for p in named.values()}
        ends = {id(p): self._chains(p, live) for group in optimizer.param_groups for p in group["params"]}
        claimed = {id(end) for chains in ends.values() for end, _ in chains}
        claimed |= {id(p) for group in optimizer.param_groups for p in group["params"]}
        counts = {"remapped": 0, "dropped": 0, "reset": 0}
        state, placed = {}, set()
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                old_state = optimizer.state.get(p, {})
                chains, reset = ends[id(p)], False
                if not chains:
                    name = (self._names or {}).get(id(p), ("", None))[0]
                    if name in named and id(named[name]) not in claimed:  # replaced by a path that did not report
                        chains, reset = [(named[name], None)], True
                        claimed.add(id(named[name]))
                    else:
                        counts["dropped"] += 1
                        continue
                for n, (end, steps) in enumerate(chains):
                    if id(end) in placed:
                        continue
                    placed.add(id(end))
                    params.append(end)
                    new_state = None if reset else _cut(old_state, steps, end, copy=n > 0)
                    reset = reset or new_state is None
                    if new_state:
                        state[end] = new_state
                if reset:
                    counts["reset"] += 1
                elif any(steps for _, steps in chains):
                    counts["remapped"] += 1
            group["params"][:] = params  # in place: an optimizer may hold the list itself (LBFGS)
        optimizer.state.clear()
        optimizer.state.update(state)
        if clear:
            self.clear()
        return counts


def _cut(state: dict, steps: list[_Step], end: torch.Tensor, copy: bool = False) -> Optional[dict]:
    """A parameter's state carried along `steps` to `end` (with `copy`, in tensors of its own: a second end of a
    tied weight); None when a tensor in it is shaped like neither a scalar nor the parameter (it cannot be cut)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and steps:
            for step in steps:
                value = step.apply(value)
                if value is None:
                    return None
            if value.shape != end.shape:
                return None
        out[key] = value.clone() if copy and isinstance(value, torch.Tensor) else value
    return out
