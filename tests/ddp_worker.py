"""Run by test_ddp.py under `torchrun --nproc_per_node 2`: trains a tiny model and reports per-rank facts."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from compressor import rundir, train
from compressor.data import build_datasets
from compressor.models import build_arch
from compressor.recipe import recipe_from_dict
from tests.conftest import tiny_recipe


def main(out_dir: Path) -> None:
    writes = []
    original = rundir.save_torch

    def recording_save(obj, path):
        writes.append(str(path))
        return original(obj, path)

    rundir.save_torch = recording_save
    recipe = recipe_from_dict(tiny_recipe(finetune={"epochs": 2}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    result = train.fit(model, train_set, val_set, recipe.finetune, recipe.data, checkpoint=out_dir / "ckpt.pt")
    digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                     for t in model.state_dict().values())).hexdigest()
    facts = {"rank": dist.get_rank(), "world": dist.get_world_size(), "digest": digest, "writes": writes,
             "steps_per_epoch": len(result.history) and result.history[-1]["epoch"], "val_top1": result.final["val_top1"]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    if dist.get_rank() == 0:
        (out_dir / "ranks.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
