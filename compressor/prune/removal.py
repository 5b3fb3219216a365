"""Physical removal of a plan's channels and heads (through torch-pruning) and of a decoder LM's structures
(models/decoder), checked by one forward pass."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from compressor.errors import NotPrunableError
from compressor.models.decoder import is_decoder_root, remove_plan, site_of
from compressor.prune import graph as dg
from compressor.prune import heads as heads_mod
from compressor.prune.snapshot import Plan


def remove(model: nn.Module, example: torch.Tensor, plan: Plan) -> int:
    """Physically remove the planned channels (every coupled slice, through torch-pruning); returns the count."""
    plan = {root: idxs for root, idxs in plan.items() if idxs}
    if not plan:
        return 0
    with dg.quiet_eval(model):
        removed = 0
        for root in [r for r in plan if heads_mod.is_head_root(r)]:  # local to their layer: no graph needed
            heads_mod.remove_heads(model, root, list(plan[root]))
            removed += len(plan.pop(root))
        decoder = {root: list(plan.pop(root)) for root in [r for r in plan if is_decoder_root(r)]}
        if decoder:  # a decoder LM's layers, key/value groups, MLP and hidden channels (models/decoder)
            removed += remove_plan(model, decoder)
        graph = dg.trace(model, example) if plan else None
        for root, idxs in plan.items():
            module = model.get_submodule(root)
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
            if not graph.check_pruning_group(group):
                raise NotPrunableError(f"removing {len(idxs)} channels of {root} would leave a layer without channels.")
            try:
                group.prune(record_history=False)
            except Exception as exc:  # torch-pruning fails with bare IndexError/RuntimeError on layers it mis-maps
                raise NotPrunableError(
                    f"torch-pruning failed while removing {len(idxs)} channels of {root} and the layers coupled to it "
                    f"({type(exc).__name__}: {exc}).",
                    hint=f"Add {root!r} to model.ignore to keep that group whole (`compressor inspect` lists the "
                         "coupled layers), or use FGGP unstructured / 2:4, which does not change shapes.") from exc
            removed += len(idxs)
        check_forward(model, example, list(plan) or list(decoder) or ["attention heads"])
    return removed


def follow_roots(model: nn.Module, roots: Iterable[str]) -> Callable[[], dict[str, Optional[str]]]:
    """A decoder LM's roots name their layer by index, which removing layers changes. Call before a removal; the
    function returned gives, after it, each of `roots`' new name (None: its layer was removed). Other roots are
    left out (their names do not change)."""
    sites = {root: site_of(model, root) for root in roots if is_decoder_root(root)}

    def after() -> dict[str, Optional[str]]:
        names: dict[str, Optional[str]] = {}
        for root, site in sites.items():
            try:
                names[root] = site.root
            except NotPrunableError:  # the layer is gone
                names[root] = None
        return names

    return after


def check_forward(model: nn.Module, example: torch.Tensor, roots: list[str]) -> None:
    """Run the pruned model once; a failure names the layer it failed in (torch-pruning followed a channel mapping
    this architecture does not have) instead of surfacing later as a traceback in training or export."""
    names = dg.module_names(model)
    running: list[nn.Module] = []

    def enter(module, _inputs) -> None:
        running.append(module)

    def leave(_module, _inputs, _output) -> None:  # a forward hook that returned a value would replace the output
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # any op can be the one whose shapes no longer fit
        where = names.get(running[-1], "?") if running else "?"
        raise NotPrunableError(
            f"after removing channels of {', '.join(roots)}, the model fails in layer {where} "
            f"({type(running[-1]).__name__ if running else '?'}: {type(exc).__name__}: {exc}); torch-pruning did not "
            "follow this architecture's channel mapping there.",
            hint=f"Add the layers feeding {where} to model.ignore (`compressor inspect` lists the groups and what "
                 "each couples), or use FGGP unstructured / 2:4, which does not change shapes.") from exc
    finally:
        for hook in hooks:
            hook.remove()
