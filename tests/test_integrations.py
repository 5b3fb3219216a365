"""compressor.integrations: the Hugging Face Trainer and Lightning callbacks over compressor.Pruner, on tiny models
and synthetic images (hooks per optimizer step under gradient accumulation, the framework's optimizer and LR
scheduler across a removal, resume from the framework's checkpoint), and the import error without the extra."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compressor.errors import UsageError
from compressor.train.data import SyntheticImages

# DPM to 60% of the MACs: one event at step 0, two decay steps one optimizer step apart, so the channels are
# removed at step 1, in the first epoch
PRUNE = {"method": "dpm", "host": "depgraph", "target": {"macs": 0.6},
         "schedule": {"events": 1, "start_epoch": 0, "end_epoch": 1}, "dpm": {"steps": 2, "interval": 1}}
EXAMPLE = torch.zeros(1, 1, 16, 16)


def images(size: int = 64) -> SyntheticImages:
    return SyntheticImages(size, [1, 16, 16], 4, seed=0)


def optimizer_follows_model(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int) -> None:
    """Every parameter the optimizer updates is one of the model's now, its state has the parameter's shape, and its
    Adam step count is the run's: the state was carried over at the removal, not reset."""
    params = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) in params
            state = optimizer.state[p]
            assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
            assert int(state["step"]) == steps


# ---------------------------------------------------------------------------------------------- Hugging Face
def pixel_values(pairs: Dataset) -> list[dict]:
    """(image, label) pairs as the dicts a Hugging Face image classifier takes (a list is a map-style dataset)."""
    return [{"pixel_values": image, "labels": label} for image, label in pairs]


def hf_model():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[16, 16],
                                                     depths=[1, 1], layer_type="basic", num_labels=4))


def hf_trainer(tmp_path, model, callback, **args):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True, save_strategy="no",
                    report_to=[], disable_tqdm=True, logging_strategy="no", seed=0, dataloader_num_workers=0)
    return Trainer(model=model, args=TrainingArguments(**{**settings, **args}), train_dataset=pixel_values(images()),
                   callbacks=[callback])


def test_hf_callback_prunes_once_per_optimizer_step_and_keeps_the_trainers_optimizer(tmp_path):
    from compressor.integrations.transformers import PruningCallback

    model = hf_model()
    dense_width = model.resnet.encoder.stages[0].layers[0].layer[0].convolution.out_channels
    callback = PruningCallback(EXAMPLE, prune=PRUNE)
    trainer = hf_trainer(tmp_path, model, callback)
    trainer.train()
    # 64 images in micro-batches of 8, accumulated by 2: 4 optimizer steps per epoch, 8 in all
    assert trainer.state.global_step == 8 and callback.pruner.step == 8 and callback.pruner.epoch == 2
    # after the last removal the batch-norm statistics were re-estimated on the training loader (8 batches of 8)
    assert callback.pruner.bn_recalibration["samples"] == 64 and callback.pruner.bn_recalibration["layers"] > 0
    events = callback.pruner.summary()["events"]
    assert events[0]["removed"] > 0 and callback.pruner.structure_changes >= 1
    assert events[0]["achieved_macs"] == pytest.approx(0.6, abs=0.06)
    assert model.resnet.encoder.stages[0].layers[0].layer[0].convolution.out_channels < dense_width
    assert callback.pruner.model.model is model  # the logits wrapper holds the Trainer's model, pruned in place
    optimizer_follows_model(trainer.optimizer.optimizer, model, steps=8)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # linear decay ran to the end
    logits = callback.pruner.model(torch.zeros(2, 1, 16, 16))
    assert logits.shape == (2, 4)


def test_hf_callback_resumes_from_a_checkpoint_written_after_a_removal(tmp_path):
    """Checkpoint at step 4 (after the removal at step 1) holds pruned weights and compressor_pruner.pt: a new
    Trainer over the dense model resumes from it and ends where the uninterrupted run ended."""
    from compressor.integrations.transformers import STATE_FILE, PruningCallback

    whole = hf_model()
    first = PruningCallback(EXAMPLE, prune=PRUNE)
    hf_trainer(tmp_path / "a", whole, first, save_strategy="steps", save_steps=4).train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / STATE_FILE).is_file()

    resumed_model = hf_model()
    second = PruningCallback(EXAMPLE, prune=PRUNE, resume_from=checkpoint)
    trainer = hf_trainer(tmp_path / "b", resumed_model, second)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert second.pruner.step == 8 and len(second.pruner.summary()["events"]) == 1  # no second selection
    ours, theirs = resumed_model.state_dict(), whole.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)

    lost = PruningCallback(EXAMPLE, prune=PRUNE)  # resuming without the state file: said, with the fix
    trainer = hf_trainer(tmp_path / "c", hf_model(), lost)
    with pytest.raises(UsageError, match="compressor_pruner.pt does not exist.*resume_from"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_module(lr: float = 1e-3):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, self.trainer.estimated_stepping_batches)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Tiny()


def lightning_trainer(tmp_path, callbacks, **args):
    import lightning as L

    settings = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                    default_root_dir=str(tmp_path))
    return L.Trainer(callbacks=callbacks, **{**settings, **args})


def test_lightning_callback_prunes_once_per_optimizer_step_and_keeps_the_optimizer(tmp_path):
    from compressor.integrations.lightning import PruningCallback

    module = lightning_module()
    callback = PruningCallback(EXAMPLE, prune=PRUNE)
    trainer = lightning_trainer(tmp_path, [callback])
    trainer.fit(module, DataLoader(images(), batch_size=8))
    assert trainer.global_step == 8 and callback.pruner.step == 8 and callback.pruner.epoch == 2
    assert callback.pruner.bn_recalibration == {"layers": 2, "batches": 8, "samples": 64}
    assert callback.pruner.summary()["events"][0]["removed"] > 0
    assert module.net[0].out_channels < 16 and module.net[1].num_features == module.net[0].out_channels
    optimizer_follows_model(trainer.optimizers[0], module, steps=8)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
    assert module(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


def test_lightning_callback_resumes_from_a_checkpoint_written_after_a_removal(tmp_path):
    import lightning as L

    from compressor.integrations.lightning import PruningCallback

    loader = DataLoader(images(), batch_size=8)  # unshuffled: the resumed epoch sees the same batches
    whole = lightning_module()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    lightning_trainer(tmp_path, [PruningCallback(EXAMPLE, prune=PRUNE), saver], enable_checkpointing=True).fit(
        whole, loader)
    first_epoch = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]

    resumed = lightning_module()
    callback = PruningCallback(EXAMPLE, prune=PRUNE)
    lightning_trainer(tmp_path, [callback]).fit(resumed, loader, ckpt_path=str(first_epoch))
    assert callback.pruner.step == 8 and len(callback.pruner.summary()["events"]) == 1
    ours, theirs = resumed.state_dict(), whole.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_lightning_callback_refuses_several_optimizers(tmp_path):
    from compressor.integrations.lightning import PruningCallback

    module = lightning_module()
    module.automatic_optimization = False
    module.training_step = lambda batch, batch_idx: None
    module.configure_optimizers = lambda: [torch.optim.SGD(module.net[:3].parameters(), lr=0.1),
                                           torch.optim.SGD(module.net[3:].parameters(), lr=0.1)]
    with pytest.raises(UsageError, match="remaps one optimizer; configure_optimizers returned 2"):
        lightning_trainer(tmp_path, [PruningCallback(EXAMPLE, prune=PRUNE)], accumulate_grad_batches=1).fit(
            module, DataLoader(images(), batch_size=8))


# ---------------------------------------------------------------------------------------------- shared rules
def test_hooks_before_training_and_a_distributed_run_are_refused():
    from compressor.integrations.adapter import PrunerAdapter, single_process

    adapter = PrunerAdapter("lightning", EXAMPLE, prune=PRUNE, ignore=(), round_to=None, on_structure_change=None,
                            loss_fn=None, calibration=None)
    with pytest.raises(UsageError, match="on_train_end ran before training started"):
        adapter.require("on_train_end")
    with pytest.raises(UsageError, match="prunes single-process training; this run has 2 processes"):
        single_process(2, "transformers")
    single_process(1, "transformers")
    with pytest.raises(UsageError, match="example_inputs must be one input batch as a tensor"):
        PrunerAdapter("transformers", [1, 2], prune=PRUNE, ignore=(), round_to=None, on_structure_change=None,
                      loss_fn=None, calibration=None)


@pytest.mark.parametrize("module, package, extra", [("transformers", "transformers", "hf"),
                                                    ("lightning", "lightning.pytorch", "lightning")])
def test_importing_an_integration_without_its_framework_names_the_extra(monkeypatch, module, package, extra):
    from compressor.errors import BackendUnavailable
    from compressor.integrations import MissingExtra

    monkeypatch.setitem(sys.modules, package, None)  # what an uninstalled package looks like to import
    monkeypatch.delitem(sys.modules, f"compressor.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'compressor\[{extra}\]'") as caught:
        importlib.import_module(f"compressor.integrations.{module}")
    assert isinstance(caught.value, MissingExtra) and isinstance(caught.value, BackendUnavailable)
    assert caught.value.exit_code == 3
    monkeypatch.undo()
    assert importlib.import_module(f"compressor.integrations.{module}").PruningCallback


def test_importing_the_integrations_package_imports_no_framework():
    import subprocess

    code = ("import sys, compressor.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
