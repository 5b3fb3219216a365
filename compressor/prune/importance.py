"""What to cut: per-channel importance of a torch-pruning dependency group (higher = more important).

Scorers are separate from the execution (hosts, DPM, FGGP decide how and when). Gradient-based scorers
accumulate between selection events through `observe()`, called by the training loop after each backward with
true gradients (unscaled under AMP) and never on an AMP step whose gradients overflowed (see train._train_epoch).
What they accumulated goes into the checkpoint by parameter name (`state_dict`) and comes back on the resumed
model's parameters (`load_state_dict`, then `bind`), so a run resumed between two events scores as if uninterrupted.
"""
from __future__ import annotations

import abc
from typing import Any, Literal, Optional

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn

from compressor.config import Strict
from compressor.errors import RecipeError
from compressor.models.attention import embed_tensors
from compressor.models.layers import is_depthwise
from compressor.prune.graph import is_out_handler
from compressor.registry import Registry
from compressor.structure_slice import Slice  # noqa: F401  (re-exported: scorers and slices take it from here)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


class Scorer(abc.ABC):
    """Per-channel scores of a group (a 1-d tensor of the group's width), not normalised."""

    needs_gradients = False

    def __init__(self, cfg: ImportanceConfig) -> None:
        self.cfg = cfg

    def observe(self, model: nn.Module) -> None:
        """Accumulate gradient statistics of the current batch (gradient-based scorers only); the caller passes
        unscaled, finite gradients."""

    def reset(self) -> None:
        """Forget accumulated statistics (after a selection event or a structural change)."""

    @property
    def observed_batches(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of the accumulated statistics (plain data; {} for scorers that accumulate none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what state_dict() returned; it applies to a model once bind() names it."""

    def bind(self, model: nn.Module) -> None:
        """Attach restored statistics to `model`'s parameters (training starts or resumes on `model`)."""

    @abc.abstractmethod
    def __call__(self, group) -> Optional[torch.Tensor]:
        """Scores of the group's channels, or None when the group has nothing this scorer can rank."""

    def slices(self, pairs: list[tuple["Slice", list[int]]], width: int) -> Optional[torch.Tensor]:
        """Scores of `width` structures given as (Slice, structure of each row) pairs (attention heads,
        prune/heads.py), or None when this scorer cannot rank them."""
        return None


IMPORTANCES: Registry[type[Scorer]] = Registry("importance", RecipeError)


@IMPORTANCES.register("magnitude")
class Magnitude(Scorer):
    """Group L_p norm of every coupled slice (DepGraph's group magnitude)."""

    def __init__(self, cfg: ImportanceConfig) -> None:
        super().__init__(cfg)
        self._tp = tp.importance.GroupMagnitudeImportance(p=cfg.p, group_reduction="mean", normalizer=None)

    def __call__(self, group) -> Optional[torch.Tensor]:
        return self._tp(group)

    def slices(self, pairs, width: int) -> Optional[torch.Tensor]:
        """Mean over the slices of each structure's L_p norm (as the group magnitude reduces its members)."""
        total = torch.zeros(width, dtype=torch.float64)
        with torch.no_grad():
            for sl, roots in pairs:
                total.scatter_add_(0, torch.as_tensor(roots), _per_row(sl, sl.param.detach().abs().pow(self.cfg.p)))
        return (total / max(len(pairs), 1)).pow(1.0 / self.cfg.p).float() if pairs else None


def _per_row(sl: "Slice", values: torch.Tensor) -> torch.Tensor:
    """`values` (shaped like sl.param) summed over everything but the slice's rows, in the slice's row order."""
    rows = values.index_select(sl.dim, torch.as_tensor(sl.idxs, device=values.device))
    return (rows.transpose(0, sl.dim).flatten(1).sum(1) if rows.ndim > 1 else rows).double().cpu()


@IMPORTANCES.register("bn-scale")
class BNScale(Scorer):
    """|gamma| of the batch-norm layers in the group (network slimming)."""

    def __init__(self, cfg: ImportanceConfig) -> None:
        super().__init__(cfg)
        self._tp = tp.importance.BNScaleImportance(normalizer=None)

    def __call__(self, group) -> Optional[torch.Tensor]:
        return self._tp(group)


@IMPORTANCES.register("random")
class Random(Scorer):
    """Uniform random scores (a baseline); reproducible under the run's seed."""

    def __call__(self, group) -> Optional[torch.Tensor]:
        return torch.rand(len(group[0].idxs))

    def slices(self, pairs, width: int) -> Optional[torch.Tensor]:
        return torch.rand(width)


class _Accumulating(Scorer):
    needs_gradients = True

    def __init__(self, cfg: ImportanceConfig) -> None:
        super().__init__(cfg)
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.names: dict[nn.Parameter, str] = {}  # each summed parameter's name in the model (for checkpoints)
        self.batches = 0
        self._restored: dict[str, torch.Tensor] = {}  # sums by name from a checkpoint, until bind()

    def reset(self) -> None:
        self.sums, self.names, self.batches, self._restored = {}, {}, 0, {}

    @property
    def observed_batches(self) -> int:
        return self.batches

    @abc.abstractmethod
    def _params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the parameters whose w * grad this scorer accumulates."""

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        for name, p in self._params(model):
            if p.grad is None:
                continue
            contribution = (p.detach() * p.grad.detach()).float()
            previous = self.sums.get(p)
            self.sums[p] = contribution if previous is None or previous.shape != p.shape else previous + contribution
            self.names[p] = name
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        """The sums by parameter name, in the current parameters' shapes (a removal resets them), and the count."""
        return {"batches": self.batches, "sums": {self.names[p]: s.detach().cpu() for p, s in self.sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint without scores (older, or saved right after an event) restores none."""
        self.sums, self.names = {}, {}
        self.batches, self._restored = int(state.get("batches", 0)), dict(state.get("sums", {}))

    def bind(self, model: nn.Module) -> None:
        """Restored sums onto the parameters of the same name; a sum whose shape no longer matches is dropped, as
        observe() starts such a parameter over."""
        if not self._restored:
            return
        for name, p in self._params(model):
            restored = self._restored.get(name)
            if restored is not None and restored.shape == p.shape:
                self.sums[p], self.names[p] = restored.to(p.device), name
        self._restored = {}


@IMPORTANCES.register("taylor")
class Taylor(_Accumulating):
    """Group first-order Taylor score |sum over batches of w * dL/dw|, summed over each channel's slices."""

    def _params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def __call__(self, group) -> Optional[torch.Tensor]:
        return self.slices([pair for item in group for pair in channel_slices(
            item.dep.target.module, item.dep.handler, item.idxs, item.root_idxs, out_only=False)], len(group[0].idxs))

    def slices(self, pairs, width: int) -> Optional[torch.Tensor]:
        total = torch.zeros(width, dtype=torch.float64)
        used = 0
        for slice_, root in pairs:
            acc = self.sums.get(slice_.param)
            if acc is None:
                continue
            total.scatter_add_(0, torch.as_tensor(root), _per_row(slice_, acc.abs()))
            used += 1
        return (total / used).float() if used else None


@IMPORTANCES.register("gate")
class Gate(_Accumulating):
    """Gate Decorator: |sum over batches of gamma * dL/dgamma| of the batch-norm scale gates in the group."""

    def _params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
                if isinstance(m, NORM_TYPES) and m.weight is not None]

    def __call__(self, group) -> Optional[torch.Tensor]:
        width = len(group[0].idxs)
        total, used = torch.zeros(width), 0
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, NORM_TYPES) or module.weight not in self.sums:
                continue
            acc = self.sums[module.weight]
            total.scatter_add_(0, torch.as_tensor(item.root_idxs), acc[torch.as_tensor(item.idxs)].abs().cpu())
            used += 1
        return total / used if used else None


@IMPORTANCES.register("saliency")
class Saliency(Scorer):
    """OCSP saliency: mean over group members of sum(w^2) / sqrt(fan) per channel (norm layers: gamma^2).

    Dividing by sqrt(fan) makes scores of layers with different fan-in comparable, so they rank globally raw.
    """

    def __call__(self, group) -> Optional[torch.Tensor]:
        width = len(group[0].idxs)
        total, used = torch.zeros(width), 0
        for item in group:
            module = item.dep.target.module
            pairs = [(sl, roots) for sl, roots in
                     channel_slices(module, item.dep.handler, item.idxs, item.root_idxs, out_only=False)
                     if not (isinstance(module, NORM_TYPES) and sl.param is not module.weight)]  # BN: gamma only
            if pairs:
                total += self._sum(pairs, width)
                used += 1
        return total / used if used else None

    def slices(self, pairs, width: int) -> Optional[torch.Tensor]:
        return self._sum(pairs, width) / len(pairs) if pairs else None

    @staticmethod
    def _sum(pairs, width: int) -> torch.Tensor:
        total = torch.zeros(width)
        with torch.no_grad():
            for sl, roots in pairs:
                rows = sl.param.detach().index_select(sl.dim, torch.as_tensor(sl.idxs)).transpose(0, sl.dim)
                rows = rows.reshape(len(sl.idxs), -1)
                per_row = rows.pow(2).sum(1) / (rows.shape[1] ** 0.5 if rows.shape[1] > 1 else 1.0)
                total.scatter_add_(0, torch.as_tensor(roots), per_row.float().cpu())
        return total


def build_scorer(cfg: ImportanceConfig) -> Scorer:
    return IMPORTANCES.get(cfg.kind)(cfg)


# ---------------------------------------------------------------------------------------------- slices
def channel_slices(module: nn.Module, handler, idxs: list[int], root_idxs: list[int], *, out_only: bool):
    """(Slice, root_idxs) pairs of a group member: producer rows and bias, norm affine, and (unless out_only)
    consumer input columns. Members whose root_idxs are unknown (None) are skipped."""
    if root_idxs is None or any(r is None for r in root_idxs):
        return []
    is_out = is_out_handler(handler)
    pairs = []
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = is_depthwise(module, with_multiplier=False)
        out_dim = 1 if module.transposed else 0
        if is_out or depthwise:
            pairs.append((Slice(module.weight, out_dim, idxs, True), root_idxs))
            if module.bias is not None:
                pairs.append((Slice(module.bias, 0, idxs, True), root_idxs))
        elif not out_only and module.groups == 1:
            pairs.append((Slice(module.weight, 1 - out_dim, idxs, False), root_idxs))
    elif isinstance(module, nn.Linear):
        if is_out:
            pairs.append((Slice(module.weight, 0, idxs, True), root_idxs))
            if module.bias is not None:
                pairs.append((Slice(module.bias, 0, idxs, True), root_idxs))
        elif not out_only:
            pairs.append((Slice(module.weight, 1, idxs, False), root_idxs))
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        for param in (module.weight, module.bias):
            if param is not None and param.ndim == 1:
                pairs.append((Slice(param, 0, idxs, True), root_idxs))
    elif isinstance(module, nn.PReLU) and module.weight.numel() > 1:
        pairs.append((Slice(module.weight, 0, idxs, True), root_idxs))
    elif (embed := embed_tensors(module)) is not None:  # an attention layer on the residual stream
        # (prune.attention.embed): one node for both sides, so its output rows and, unless out_only, its q/k/v columns
        pairs += [(Slice(getattr(owner, attr), dim, idxs, True), root_idxs) for owner, attr, dim in embed[1]]
        if not out_only:
            pairs += [(Slice(getattr(owner, attr), dim, idxs, False), root_idxs) for owner, attr, dim in embed[0]]
    return pairs


class ImportanceConfig(Strict):
    """prune.importance: a registered importance kind (IMPORTANCES) and the norm of magnitude-based kinds."""

    kind: Literal[tuple(IMPORTANCES.names())] = "magnitude"  # type: ignore[valid-type]
    p: int = Field(2, ge=1, le=2)
