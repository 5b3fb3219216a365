"""Device plumbing without a GPU: which device each process computes on (torchrun ranks) and that evaluation runs
the model where its inputs go, returning it to the device it came on."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compressor.errors import UsageError
from compressor.ranks import compute_device
from compressor.train.loop import evaluate


def test_single_process_keeps_the_device_asked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert compute_device("cpu") == torch.device("cpu")
    assert compute_device("cuda") == torch.device("cuda")
    assert compute_device("cuda:1") == torch.device("cuda", 1)


def test_torchrun_ranks_take_their_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute_device("cuda") == torch.device("cuda", 1)  # not cuda:0 for every rank
    assert compute_device("cuda:1") == torch.device("cuda", 1)
    assert compute_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"--device cuda:0 under torchrun.*Pass --device cuda"):
        compute_device("cuda:0")


class Placed(nn.Module):
    """Records every device it is moved to and the devices its forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.moves: list[torch.device] = []
        self.seen: list[tuple[torch.device, torch.device]] = []

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if device is not None and not isinstance(device, torch.dtype):
            self.moves.append(torch.device(device))
        return super().to(*args, **kwargs)

    def forward(self, x):
        self.seen.append((x.device, self.fc.weight.device))
        return self.fc(x)


def test_evaluate_moves_the_model_to_the_device_and_back(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = Placed()
    data = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    metrics = evaluate(model, data, batch_size=4, device="cpu")
    assert metrics["count"] == 10
    # moved to the evaluation device first (before: only the inputs moved, so a CPU model met CUDA inputs)
    assert model.moves and model.moves[0] == torch.device("cpu")
    assert all(x == w for x, w in model.seen)
    assert model.moves[-1] == torch.device("cpu")  # and back to where it was


def test_evaluate_under_torchrun_uses_the_rank_device(monkeypatch):
    """Two ranks asked for `cuda` evaluate on cuda:LOCAL_RANK; here only the device asked for is checked (no GPU):
    the move is recorded and then refused by the stand-in."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model = Placed()

    class Refused(Exception):
        pass

    def refuse(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        self.moves.append(torch.device(device))
        raise Refused

    monkeypatch.setattr(Placed, "to", refuse)
    data = TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(Refused):
        evaluate(model, data, batch_size=4, device="cuda")
    assert model.moves == [torch.device("cuda", 1)]
