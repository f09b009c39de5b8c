import copy

import pytest
import torch
from torch import nn

from dard.config import AttackConfig, LossConfig
from dard.data import TrainBatch
from dard.engine import NonFiniteLossError, place_model, resolve_device, train_epoch
from dard.models import build


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


class NaNAfter(nn.Module):
    """A linear model whose output turns NaN from the given call on."""

    def __init__(self, after: int):
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_stops_before_the_update():
    model = NaNAfter(after=2)
    batches = [TrainBatch(torch.rand(4, 1, 4, 4), torch.randint(0, 10, (4,))) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="epoch 3, step 2"):
        train_epoch(model, batches, opt, loss_cfg=LossConfig(method="natural"), attack_cfg=AttackConfig(),
                    device=torch.device("cpu"), epoch=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_train_epoch_reports_metrics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    batches = [TrainBatch(torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))) for _ in range(3)]
    out = train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_cfg=LossConfig(method="sat"),
                      attack_cfg=AttackConfig(eps=0.1, step_size=0.05, steps=1), device=torch.device("cpu"))
    assert out["samples"] == 24 and out["steps"] == 3 and out["loss"] > 0 and "ce_adv" in out


def test_channels_last_on_cpu_where_it_wins_and_the_same_training():
    """Wide convolutions train in channels_last on a CPU, narrow ones in the default format; either
    way the model computes the same logits and takes the same SGD step (within float rounding)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    wide, narrow = build("cnn_small", 10, 1), build("cnn_small", 10, 1, width=0.25)
    placed = place_model(copy.deepcopy(wide), cpu)
    assert placed.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not place_model(copy.deepcopy(narrow), cpu).features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for model in (wide, placed):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    for a, b in zip(wide.parameters(), placed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide.eval()(x), placed.eval()(x), rtol=1e-5, atol=1e-6)
