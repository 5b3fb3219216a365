"""Time per training step with DPM's hooks vs plain fine-tuning, on the sample ResNet-20 / Fashion-MNIST.

    python benchmarks/dpm_overhead.py [--steps 200] [--repeats 3]

Two measures: (1) plain and DPM fine-tuning runs of the same length, interleaved (plain, DPM, plain, DPM ...),
median seconds per step of each; (2) the time spent inside DPM's hooks divided by the step time, from timers around
the hooks (robust to machine noise). Physical removals rebuild the model and optimizer; they are counted in both.
Writes benchmarks/results/dpm_overhead.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import table, write_result
from compressor.train.data import build_datasets
from compressor.prune.methods import METHODS
from compressor.prune.methods.base import PruningMethod
from compressor.models.loading import load_model
from compressor.app.recipe import load_recipe
from compressor.train.loop import fit

HOOKS = ("on_train_start", "after_backward", "after_step", "on_epoch_end", "finalize")


class Timed(PruningMethod):
    """Forwards every hook to `inner` and adds up the seconds spent in them."""

    def __init__(self, inner: PruningMethod) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattribute__(self, name):
        if name in HOOKS:
            inner = object.__getattribute__(self, "inner")

            def timed(ctx, _fn=getattr(inner, name)):
                start = time.perf_counter()
                _fn(ctx)
                self.seconds += time.perf_counter() - start

            return timed
        return object.__getattribute__(self, name)


def run(method: str, steps: int, seed: int) -> tuple[float, float]:
    """(seconds per step, seconds in hooks per step) of one fine-tuning run of `steps` optimizer steps."""
    batch = 128
    overrides = [f"data.train_subset={steps * batch}", "finetune.epochs=1", f"finetune.seed={seed}",
                 f"prune.method={method}", "prune.schedule.end_epoch=1", "prune.dpm.interval=10"]
    recipe = load_recipe("resnet20-fmnist-dpm", overrides)
    model = load_model("samples/resnet20-fmnist.safetensors", recipe.model)
    train, val = build_datasets(recipe.data, recipe.model)
    val = torch.utils.data.Subset(val, range(256))
    timed = Timed(METHODS.get(method)(recipe.prune_spec()))
    result = fit(model, train, val, recipe.finetune, recipe.data, method=timed)
    return result.history[0]["seconds"] / steps, timed.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plain, dpm, hooks = [], [], []
    for repeat in range(args.repeats):
        plain.append(run("none", args.steps, repeat)[0])
        step, hook = run("dpm", args.steps, repeat)
        dpm.append(step)
        hooks.append(hook)
    p, d, h = statistics.median(plain), statistics.median(dpm), statistics.median(hooks)
    rows = [["plain fine-tuning", f"{p * 1e3:.1f}", "-", "-"],
            ["DPM-SP+SR (depgraph host, quickstart recipe, N=8, interval 10)", f"{d * 1e3:.1f}", f"{(d / p - 1) * 100:+.1f}%",
             f"{h / d * 100:.1f}%"]]
    text = (f"# DPM overhead per training step\n\n`python benchmarks/dpm_overhead.py --steps {args.steps} --repeats "
            f"{args.repeats}`: sample ResNet-20, batch 128, runs interleaved, medians over repeats. The DPM run prunes "
            "to macs 0.5 during the run, so its later steps are on a smaller model.\n\n"
            + table(["run", "ms / step", "vs plain", "time in DPM hooks"], rows))
    write_result("dpm_overhead.md", text)


if __name__ == "__main__":
    main()
