"""The GPU check, prepared to fit 10 minutes on one H100/H200 with torch, pyarrow, pillow, pyyaml,
tqdm and scikit-learn (no Ray, no MLflow): CIFAR-shaped synthetic images (3x32x32) as a source of
yours, shards precomputed by the teacher, then a SAT and a DARD epoch of the student from those
shards in FP32, in bf16 autocast with channels_last and, with ``--compile``, ``torch.compile``d.
For each: images/s, the FLOPs of one training step (the attack's steps and the update, counted by
torch's FlopCounterMode) and the share of the card's dense bf16 peak they reach.

    bash benchmarks/gpu.sh                                  # on the GPU machine ($OUT gets gpu.json|md)
    python benchmarks/gpu.py --tiny --device cpu --out D    # the suite's check: a tiny size on a CPU

Writes ``gpu.json`` and ``gpu.md`` to ``--out``; prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic import synthetic_table  # noqa: E402
from dard.data import source_config  # noqa: E402
from dard.engine import resolve_device, train_epoch  # noqa: E402
from dard.losses import get_loss  # noqa: E402
from dard.modelfile import save_for  # noqa: E402
from dard.models import build_for  # noqa: E402
from dard.precompute import build_shards  # noqa: E402
from dard.shards import ShardSet  # noqa: E402
from dard.training import make_optimizer, shard_batches  # noqa: E402

# Dense bf16 tensor-core peak (FLOP/s; vendor datasheets, no sparsity) by device-name substring,
# the first match wins: the one reference every arm is measured against, FP32 included (so its
# share shows what bf16 and channels_last leave on the table).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}
ARMS = {"fp32": {"amp": False, "channels_last": False, "compile": False},
        "bf16 + channels_last": {"amp": True, "channels_last": True, "compile": False},
        "bf16 + channels_last + compile": {"amp": True, "channels_last": True, "compile": True}}
METHODS = {"SAT": {"method": "sat"}, "DARD": {}}  # DARD: the dataset's default DARD loss


def peak_of(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"CPU ({torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name(device)
    return name, next((p for key, p in PEAK_BF16.items() if key in name), None)


class _Flops(TorchDispatchMode):
    """Sums the FLOPs of the matmuls and convolutions dispatched inside it, by torch's own formulas
    (torch.utils.flop_counter's registry; its FlopCounterMode cannot count an attack: its module
    hooks break ``autograd.grad`` on the input)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def step_flops(model: torch.nn.Module, batch, cfg) -> float:
    """FLOPs of one training step on ``batch`` (the attack's forward/backward passes, the loss and
    its backward), per image."""
    with _Flops() as counter:
        get_loss(cfg.loss.method)(model, batch, cfg.loss, cfg.attack).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.total / len(batch.y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, shards: ShardSet, device: torch.device, arm: dict, warm_steps: int, epochs: int) -> dict:
    """Train the student of ``cfg`` from ``shards``: ``warm_steps`` untimed (compilation, cuDNN's
    choice of kernels), then ``epochs`` timed epochs read from the shards as training reads them."""
    torch.manual_seed(cfg.run.seed)
    model = build_for(cfg.model, cfg.data).to(device)
    if arm["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    flops = step_flops(model, next(shard_batches(shards, cfg)[0](0)).to(device), cfg)
    trained = torch.compile(model) if arm["compile"] else model
    optimizer = make_optimizer(model, cfg)
    source, steps = shard_batches(shards, cfg)
    amp = arm["amp"] and device.type == "cuda"
    kw = {"loss_cfg": cfg.loss, "attack_cfg": cfg.attack, "device": device, "amp": amp}
    train_epoch(trained, islice(source(0), warm_steps), optimizer, **kw)
    sync(device)
    images, seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        r = train_epoch(trained, source(epoch), optimizer, **kw)
        sync(device)
        images, seconds = images + r["samples"], seconds + time.perf_counter() - start
    return {"images_per_s": images / seconds, "ms_per_step": 1000 * seconds / (epochs * steps),
            "gflops_per_image": flops / 1e9, "achieved_tflops": flops * images / seconds / 1e12, "amp": amp}


def run(args) -> dict:
    device = resolve_device(args.device)
    card, peak = peak_of(device)
    work = Path(args.work or tempfile.mkdtemp(prefix="dard-gpu-"))
    started = time.perf_counter()
    source = synthetic_table(work / "synthetic.parquet", args.samples, (3, 32, 32))
    base = {"data": {"source": source}, "attack": {"steps": args.steps},
            "optim": {"batch_size": args.batch, "epochs": 1 + args.epochs}, "model": {"arch": args.arch},
            "run": {"out_dir": str(work / "run"), "progress": False, "device": args.device}}
    teacher_cfg = source_config("cifar-shaped", **{**base, "model": {"arch": args.teacher_arch}})
    teacher = save_for(work / "teacher.pt", build_for(teacher_cfg.model, teacher_cfg.data), teacher_cfg)
    cfg = source_config("cifar-shaped", **base)
    t0 = time.perf_counter()
    build_shards(cfg, teacher, str(work / "shards"), views=1, rows_per_part=max(args.batch, args.samples // 4),
                 batch_size=args.batch)
    sync(device)
    precompute_s = time.perf_counter() - t0
    shards = ShardSet.open(str(work / "shards"))
    arms = [a for a in ARMS if args.compile or not ARMS[a]["compile"]]
    rows = []
    for arm in arms:
        for method, loss in METHODS.items():
            run_cfg = cfg.updated(loss=loss) if loss else cfg
            r = measure(run_cfg, shards, device, ARMS[arm], args.warm_steps, args.epochs)
            r.update(arm=arm, method=method, peak_share=r["achieved_tflops"] * 1e12 / peak if peak else None)
            rows.append(r)
            share = f"{100 * r['peak_share']:.1f}%" if peak else "—"
            print(f"{arm:<31} {method:<5} {r['images_per_s']:>9.1f} img/s {r['ms_per_step']:>8.1f} ms/step "
                  f"{r['achieved_tflops']:>7.2f} TFLOP/s {share:>7}", flush=True)
    return {"machine": f"{platform.machine()} {card}, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
            "peak_bf16_flops": peak, "student": args.arch, "teacher": args.teacher_arch, "samples": args.samples,
            "batch": args.batch, "attack_steps": args.steps, "epochs_timed": args.epochs,
            "precompute_images_per_s": args.samples / precompute_s, "rows": rows,
            "total_s": time.perf_counter() - started}


def table(result: dict) -> str:
    lines = [f"# GPU check: {result['student']} from {result['teacher']} shards, CIFAR-shaped synthetic data", "",
             f"- machine: {result['machine']}; {result['date']}",
             f"- {result['samples']} samples, batch {result['batch']}, PGD/DPGD-{result['attack_steps']} "
             f"steps, {result['epochs_timed']} timed epoch(s) after a warm-up; `python benchmarks/gpu.py`",
             f"- teacher precompute: {result['precompute_images_per_s']:.1f} images/s "
             f"(fp32); whole run {result['total_s']:.0f} s",
             "- share of peak: achieved FLOP/s over the card's dense bf16 tensor peak "
             f"({result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s)" if result["peak_bf16_flops"] else
             "- share of peak: no known peak for this device", "",
             "| arm | method | images/s | ms/step | GFLOP/image | TFLOP/s | share of peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else "—"
        arm = r["arm"] if r["amp"] or not r["arm"].startswith("bf16") else r["arm"] + " (no bf16 off CUDA)"
        lines.append(f"| {arm} | {r['method']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['gflops_per_image']:.2f} | {r['achieved_tflops']:.3f} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--teacher-arch", default="wrn34_10")
    p.add_argument("--steps", type=int, default=10, help="attack steps (PGD for SAT, DPGD-made views for DARD)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per arm")
    p.add_argument("--warm-steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="add the torch.compile arm")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="cnn_small from a cnn_small teacher, 64 samples, 1 step")
    p.add_argument("--work", help="folder for the synthetic table, teacher and shards (default: a temporary one)")
    p.add_argument("--out", default=".", help="folder for gpu.json and gpu.md")
    args = p.parse_args()
    if args.tiny:
        args.samples, args.arch, args.teacher_arch, args.steps, args.batch, args.epochs, args.warm_steps = (
            64, "cnn_small", "cnn_small", 1, 32, 1, 1)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    (out / "gpu.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
