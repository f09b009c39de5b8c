"""Exporting a model for deployment, with its robustness re-checked on the exported artifact.

Formats (each run by its own runtime, without dard):

- ``pt2``: ``torch.export`` with a dynamic batch dimension, saved by ``torch.export.save`` (a graph
  and its weights), run by ``torch.export.load(path).module()`` where only torch is installed.
- ``onnx``: ``torch.onnx.export(dynamo=True)`` (opset of the installed exporter), run by ONNX
  Runtime; ``int8``: ONNX Runtime's dynamic quantisation of that graph (weights int8).
- ``torchscript``: ``torch.jit.trace`` (deprecated by PyTorch from 2.14: for runtimes that still
  need it), run by ``torch.jit.load``.

An export is only as good as what it computes, so :func:`check_export` runs the exported program
itself on the test split: numerical parity with the PyTorch model (max |delta logit|, agreement of
predictions), the transfer of PGD-20 examples made on the PyTorch model, and a black-box Square
attack through the export. :meth:`ExportCheck.problems` says why a copy is refused.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dard.attacks.registry import ATTACKS, AttackParams
from dard.config import EXPORT_FORMATS
from dard.engine import correct_under
from dard.files import atomic_write
from dard.logs import percent

FORMATS = EXPORT_FORMATS
EXPORT_SUFFIXES = {"pt2": (".pt2",), "onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}
MAX_BATCH = 1 << 16
EXTRA = "pip install 'dard[export]' (onnx, onnxscript, onnxruntime)"


class ExportError(ValueError):
    """The export does not compute what the model does (the message says by how much), or cannot be made."""


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, out: str | Path, int8: bool = False,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (eval mode, on the CPU) as ``fmt`` to ``out``; ``example`` (N >= 2, C, H, W) in
    [0, 1] fixes the input's shape but for its batch dimension, which stays dynamic. ``int8``:
    quantise the weights (``onnx`` only). ``metadata`` (text by name: class names, the input it
    takes) goes into the file: ONNX metadata_props, a pt2 archive's or TorchScript file's extra
    files (``<name>.txt``); :func:`read_metadata` reads it back."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown {fmt!r} (choose from {', '.join(FORMATS)})")
    if int8 and fmt != "onnx":
        raise ExportError(f"--int8: quantisation is ONNX Runtime's; use it with --format onnx, not {fmt}")
    model, example = model.cpu().eval(), example[:2].cpu()
    batch = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    buffer = io.BytesIO()
    extra = {f"{k}.txt": v for k, v in (metadata or {}).items()}
    if fmt == "pt2":  # needs a seekable file
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(batch,)), buffer, extra_files=extra)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated, and chosen knowingly by whoever asks for it
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(model, example), buffer, _extra_files=extra)
    else:
        buffer.write(_onnx_bytes(model, example, batch, int8, metadata or {}))
    atomic_write(out, lambda f: f.write(buffer.getvalue()))
    return Path(out)


def read_metadata(path: str | Path, fmt: str) -> dict[str, str]:
    """The metadata :func:`export_model` wrote into an exported file."""
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    names = ("dard.classes", "dard.input", "dard.arch", "dard.dataset", "dard.model_sha256")
    extra = {f"{n}.txt": "" for n in names}
    if fmt == "pt2":
        torch.export.load(str(path), extra_files=extra)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), _extra_files=extra)
    return {k[:-len(".txt")]: v.decode() if isinstance(v, bytes) else v for k, v in extra.items() if v}


def _onnx_bytes(model: nn.Module, example: torch.Tensor, batch: dict, int8: bool, metadata: dict[str, str]) -> bytes:
    import importlib

    try:
        for name in ("onnxruntime", "onnxscript"):  # the check runs the file: no runtime, no export
            importlib.import_module(name)
    except ImportError as err:
        raise ExportError(f"--format onnx needs {err.name}: {EXTRA}") from err
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(model, (example,), dynamic_shapes=(batch,), dynamo=True, verbose=False,
                                    input_names=["x"], output_names=["logits"])
        program.save(str(path))
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(path), str(path.with_suffix(".int8.onnx")), weight_type=QuantType.QInt8)
            path = path.with_suffix(".int8.onnx")
        if not metadata:
            return path.read_bytes()
        import onnx

        graph = onnx.load(str(path))
        onnx.helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, **metadata})
        return graph.SerializeToString()


def load_export(path: str | Path, fmt: str) -> nn.Module:
    """The exported file run by its own runtime, as a module: ``(N, C, H, W)`` in [0, 1] -> logits ``(N, K)``."""
    if fmt == "pt2":
        return _Program(torch.export.load(str(path)).module())
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _Program(torch.jit.load(str(path)).eval())
    return _OnnxRuntime(path)


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


class _OnnxRuntime(_Program):
    """An ONNX file in an ONNX Runtime session (CPU): numpy in, numpy out; no gradients (the
    transfer and Square attacks need none)."""

    def __init__(self, path: str | Path):
        import onnxruntime

        nn.Module.__init__(self)
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        # dard's evaluation reads the device off a model's parameters: this one's is the CPU
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])


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

    def problems(self, tolerance: float, int8: bool = False, min_agreement: float = 0.99,
                 max_drop: float = 0.02) -> list[str]:
        """Why the export is refused (empty: kept). A float export must compute the model's logits
        (within ``tolerance``) and every prediction; an int8 one cannot, so it must agree on
        ``min_agreement`` of the predictions and lose at most ``max_drop`` (a fraction) of natural,
        transferred-PGD and Square accuracy: quantisation can cost robustness."""

        if not int8:
            return ([f"max |delta logit| {self.max_abs_logit_diff:.2e} > {tolerance:g}"]
                    if self.max_abs_logit_diff > tolerance else []) + (
                [f"predictions agree on {percent(self.prediction_agreement)}, not all"]
                if self.prediction_agreement < 1.0 else [])
        found = [f"predictions agree on {percent(self.prediction_agreement)} < {percent(min_agreement)}"
                 ] if self.prediction_agreement < min_agreement else []
        for name, (model, export) in (("natural", self.natural), ("PGD-20 transfer", self.pgd20_transfer),
                                      ("Square", self.square)):
            if model - export > max_drop:
                found.append(f"{name} accuracy {percent(model)} -> {percent(export)} (more than "
                             f"{100 * max_drop:.1f} points lost)")
        return found

    def table(self, label: str = "export") -> str:

        w = max(9, len(label))
        rows = [f"{'':<22} {'PyTorch':>9} {label:>{w}}"]
        for name, (a, b) in (("natural", self.natural), ("PGD-20 (transfer)", self.pgd20_transfer),
                             (f"Square ({self.square_samples})", self.square)):
            rows.append(f"{name:<22} {percent(a):>9} {percent(b):>{w}}")
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
