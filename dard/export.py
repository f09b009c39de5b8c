"""Exporting a model for deployment, with its robustness re-checked on the exported artifact.

``pt2``: ``torch.export`` with a dynamic batch dimension, saved by ``torch.export.save`` (a graph
and its weights; no Python pickle of user code) and run by ``torch.export.load(path).module()``
where only torch is installed. (TorchScript is deprecated from torch 2.14 and not offered; ONNX
is not offered yet.)

An export is only as good as what it computes, so :func:`check_export` runs the exported program
itself on the test split: numerical parity with the PyTorch model (max |delta logit|, agreement of
predictions), the transfer of PGD-20 examples made on the PyTorch model, and a black-box Square
attack through the export. A copy whose numbers differ is refused.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dard.attacks.registry import ATTACKS, AttackParams
from dard.engine import correct_under
from dard.files import atomic_write

FORMATS = ("pt2",)
MAX_BATCH = 1 << 16


class ExportError(ValueError):
    """The export does not compute what the model does (the message says by how much)."""


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, out: str | Path) -> Path:
    """Write ``model`` (eval mode, on the CPU) as ``fmt`` to ``out``; ``example`` (N, C, H, W) in
    [0, 1] fixes the input's shape but for its batch dimension, which stays dynamic."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown {fmt!r} (choose from {', '.join(FORMATS)})")
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model, (example[:2].cpu(),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch.export.save needs a seekable file
    torch.export.save(program, buffer)
    atomic_write(out, lambda f: f.write(buffer.getvalue()))
    return Path(out)


def load_export(path: str | Path) -> nn.Module:
    """The exported program as a module: ``(N, C, H, W)`` in [0, 1] -> logits ``(N, K)``."""
    return _Program(torch.export.load(str(path)).module())


class _Program(nn.Module):
    """An exported program behind the nn.Module calls dard's attacks make: it was exported in eval
    mode and has no train mode to switch to (``.eval()`` on it raises), so ``train`` is a no-op."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> "_Program":
        return self


@dataclass
class ExportCheck:
    """What the exported program computes, next to the PyTorch model, on ``samples`` test images.
    Accuracies are fractions in [0, 1]; ``pgd20_transfer``: PGD-20 examples made on the PyTorch
    model, classified by each; ``square``: the black-box attack run through each model itself."""

    samples: int
    max_abs_logit_diff: float
    prediction_agreement: float
    natural: tuple[float, float]
    pgd20_transfer: tuple[float, float]
    square: tuple[float, float]
    square_samples: int

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_logit_diff <= tolerance and self.prediction_agreement == 1.0

    def table(self) -> str:
        from dard.logs import percent

        rows = [f"{'':<22} {'PyTorch':>9} {'export':>9}"]
        for name, (a, b) in (("natural", self.natural), ("PGD-20 (transfer)", self.pgd20_transfer),
                             (f"Square ({self.square_samples})", self.square)):
            rows.append(f"{name:<22} {percent(a):>9} {percent(b):>9}")
        rows.append(f"max |delta logit| {self.max_abs_logit_diff:.2e}, predictions agree on "
                    f"{percent(self.prediction_agreement)} of {self.samples}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return asdict(self)


def check_export(model: nn.Module, exported: nn.Module, x: torch.Tensor, y: torch.Tensor, params: AttackParams,
                 square_limit: int = 200, batch_size: int = 256) -> ExportCheck:
    """Parity and robustness of ``exported`` against ``model`` on x (N, C, H, W) in [0, 1], y (N,)."""
    model = model.cpu().eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        exported_logits = torch.cat([exported(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    x_adv = torch.cat([ATTACKS["pgd20"](model, x[i:i + batch_size], y[i:i + batch_size], params)
                       for i in range(0, len(x), batch_size)])

    def accuracy(m: nn.Module, inputs: torch.Tensor) -> float:
        return correct_under(m, inputs, y, None, batch_size).float().mean().item()

    n = min(square_limit, len(y))
    square = [correct_under(m, x[:n], y[:n], lambda mm, xb, yb: ATTACKS["square"](mm, xb, yb, params),
                            batch_size).float().mean().item() for m in (model, exported)]
    return ExportCheck(samples=len(y), max_abs_logit_diff=(logits - exported_logits).abs().max().item(),
                       prediction_agreement=(logits.argmax(1) == exported_logits.argmax(1)).float().mean().item(),
                       natural=(accuracy(model, x), accuracy(exported, x)),
                       pgd20_transfer=(accuracy(model, x_adv), accuracy(exported, x_adv)),
                       square=(square[0], square[1]), square_samples=n)
