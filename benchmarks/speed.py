"""Speed, measured side by side in one run: ratios, not absolute claims.

    python benchmarks/speed.py                 # everything below, CPU, ~5 minutes on 2 cores
    python benchmarks/speed.py --only shards   # one part: shards | reader | attacks | ddp

1. shards vs online teacher: DARD epoch time when every step runs the teacher (its DPGD view
   and two forwards) vs reading the same teacher outputs from shards; on digits (cnn_large ->
   cnn_small) and on CIFAR-shaped synthetic data (WRN-34-10 -> ResNet-18, few samples).
2. reader throughput: rows/s decoded from memory-mapped shards vs rows/s the student consumes.
3. DPGD vs PGD: seconds per attack step (Dice vs CE inner loss, same model and batch).
4. DDP scaling: Ray Train images/s with 1 and 2 workers (needs Ray; skipped by gpu.sh).

Every figure prints with the machine; ``--json`` writes them for benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dard.config import Config  # noqa: E402
from dard.data import TrainBatch  # noqa: E402
from dard.data import ArrayDataset, load_splits  # noqa: E402
from dard.engine import resolve_device, train_epoch  # noqa: E402
from dard.models import build  # noqa: E402
from dard.shards import ShardReader, make_manifest, write_manifest, write_part  # noqa: E402
from dard.soft_labels import compute_part  # noqa: E402
from dard.teacher import teacher_outputs  # noqa: E402


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def build_shards(teacher, ds: ArrayDataset, cfg: Config, directory: str, views: int = 1) -> float:
    """Precompute shards for ``ds`` (one part); returns the seconds it took."""
    start = time.perf_counter()
    table = compute_part(teacher, ds, torch.arange(len(ds)).numpy(), views=views, data=cfg.data, attack=cfg.attack,
                         seed=0, part_id=0, device=next(teacher.parameters()).device)
    entry = write_part(directory, 0, table)
    write_manifest(directory, make_manifest(
        dataset=cfg.data.dataset, split="train", teacher={"id": "bench", "arch": "bench", "sha256": None},
        attack=cfg.to_dict()["attack"], data=cfg.to_dict()["data"], views=views, num_classes=cfg.data.num_classes,
        image_shape=cfg.data.image_shape, parts=[entry], rows=len(ds) * views, seed=0, plan_fingerprint="bench"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _epoch(student, batches, cfg, device) -> float:
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    train_epoch(student, batches, opt, loss_cfg=cfg.loss, attack_cfg=cfg.attack, device=device, amp=cfg.optim.amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def shards_vs_online(name: str, ds: ArrayDataset, cfg: Config, teacher_arch: str, student_arch: str,
                     device: torch.device, batch_size: int) -> dict:
    """One DARD epoch with the online teacher vs from shards, same data, models, loss and attacks."""
    c, k = cfg.data.image_shape[0], cfg.data.num_classes
    torch.manual_seed(0)
    teacher = build(teacher_arch, k, c).to(device).eval()
    student = build(student_arch, k, c).to(device)
    if device.type == "cuda":
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    x0 = torch.rand(1, *cfg.data.image_shape, device=device)
    ratio_flops = flops(teacher, x0) / flops(student, x0)

    def online():
        gen = torch.Generator().manual_seed(0)
        for s in range(0, len(ds) - batch_size + 1, batch_size):
            x = ds.images[s:s + batch_size].float().div(255).to(device)
            y = ds.labels[s:s + batch_size].to(device)
            yield TrainBatch(x, y, **teacher_outputs(teacher, x, y, cfg.attack, with_adv=True, generator=gen))

    t_online = _epoch(student, online(), cfg, device)
    with tempfile.TemporaryDirectory() as d:
        t_pre = build_shards(teacher, ds, cfg, d)
        reader = ShardReader(d, check="none")
        batches = [b.to_train_batch() for b in reader.batches(0, batch_size)]  # decoded up front: model time only
        t_shards = _epoch(student, iter(batches), cfg, device)
        start = time.perf_counter()
        rows = 0
        for _ in range(5):
            for b in reader.batches(0, batch_size):
                rows += len(b.to_train_batch().y)
        read_rps = rows / (time.perf_counter() - start)
    consumed_rps = (len(ds) // batch_size * batch_size) / t_shards
    return {"name": name, "samples": len(ds), "teacher": teacher_arch, "student": student_arch,
            "teacher_over_student_flops": ratio_flops, "online_epoch_s": t_online, "shards_epoch_s": t_shards,
            "speedup": t_online / t_shards, "precompute_s": t_pre, "reader_rows_per_s": read_rps,
            "student_rows_per_s": consumed_rps, "reader_over_student": read_rps / consumed_rps}


def attack_step_cost(device: torch.device, steps: int = 10) -> dict:
    from dard.attacks import dpgd, pgd

    torch.manual_seed(0)
    model = build("resnet18", 10, 3).to(device).eval()
    x, y = torch.rand(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    out = {}
    for name, fn in (("pgd", lambda: pgd(model, x, y, 8 / 255, 2 / 255, steps)),
                     ("dpgd", lambda: dpgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=steps))):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_s_per_step"] = (time.perf_counter() - start) / (2 * steps)
    out["dpgd_over_pgd"] = out["dpgd_s_per_step"] / out["pgd_s_per_step"]
    return out


def ddp_scaling(shards: str, cfg: Config, workers=(1, 2), epochs: int = 2) -> dict:
    """Ray Train images/s per worker count (second epoch, so start-up is excluded)."""
    from cluster.train import train_distributed

    out = {}
    for n in workers:
        with tempfile.TemporaryDirectory() as d:
            run_cfg = Config.for_dataset(cfg.data.dataset, data=cfg.to_dict()["data"], optim={"epochs": epochs},
                                         run={"out_dir": d, "progress": False, "eval_every": 1000})
            result = train_distributed(run_cfg, shards, workers=n, name=f"scaling-{n}", storage_path=d)
            m = result.history[-1]
            out[f"{n}_workers_images_per_s"] = m["train_samples"] * n / m["train_seconds"]
    out["speedup_2_over_1"] = out.get("2_workers_images_per_s", 0) / out["1_workers_images_per_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("shards", "attacks", "ddp"), help="run one part")
    p.add_argument("--device", default="auto")
    p.add_argument("--cifar-samples", type=int, default=32, help="synthetic CIFAR-shaped samples (WRN-34-10 on CPU is slow)")
    p.add_argument("--digits-samples", type=int, default=1024)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if args.only in (None, "shards"):
        digits_cfg = Config.for_dataset("digits", optim={"amp": args.amp})
        digits = load_splits(digits_cfg.data).train.head(args.digits_samples)
        cifar_cfg = Config.for_dataset("cifar10", optim={"amp": args.amp})
        gen = torch.Generator().manual_seed(0)
        n = args.cifar_samples
        cifar = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
                             torch.randint(0, 10, (n,), generator=gen), 10, "cifar10")
        rows = [shards_vs_online("digits", digits, digits_cfg, "cnn_large", "cnn_small", device, 64),
                shards_vs_online("cifar-shaped synthetic", cifar, cifar_cfg, "wrn34_10", "resnet18", device,
                                 min(32, n))]
        print(f"\n{'data':<24}{'teacher/student FLOPs':>22}{'online s/epoch':>16}{'shards s/epoch':>16}{'speedup':>9}"
              f"{'precompute s':>14}{'reader/student rows/s':>24}")
        for r in rows:
            print(f"{r['name']:<24}{r['teacher_over_student_flops']:>21.1f}x{r['online_epoch_s']:>16.2f}"
                  f"{r['shards_epoch_s']:>16.2f}{r['speedup']:>8.1f}x{r['precompute_s']:>14.2f}"
                  f"{r['reader_over_student']:>23.0f}x")
        print(f"\n{'data':<24}{'teacher precompute img/s':>26}{'student img/s online':>22}{'student img/s shards':>22}")
        for r in rows:
            n = r["samples"]
            print(f"{r['name']:<24}{n / r['precompute_s']:>26.1f}{n / r['online_epoch_s']:>22.1f}"
                  f"{n / r['shards_epoch_s']:>22.1f}")
        results["shards_vs_online"] = rows
    if args.only in (None, "attacks"):
        r = attack_step_cost(device)
        print(f"\nattack step, ResNet-18, batch 64: PGD {1000 * r['pgd_s_per_step']:.1f} ms, "
              f"DPGD {1000 * r['dpgd_s_per_step']:.1f} ms, ratio {r['dpgd_over_pgd']:.2f}")
        results["attack_step"] = r
    if args.only in (None, "ddp"):
        try:
            import ray  # noqa: F401
        except ImportError:
            print("\nDDP scaling skipped: ray is not installed")
        else:
            cfg = Config.for_dataset("digits")
            with tempfile.TemporaryDirectory() as d:
                teacher = build("cnn_large", 10, 1).eval()
                build_shards(teacher, load_splits(cfg.data).train, cfg, d)
                r = ddp_scaling(d, cfg)
            print(f"\nDDP on digits shards (Ray Train, CPU workers): 1 worker {r['1_workers_images_per_s']:.0f} img/s, "
                  f"2 workers {r['2_workers_images_per_s']:.0f} img/s, ratio {r['speedup_2_over_1']:.2f}")
            results["ddp_scaling"] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
