"""Speed, measured side by side in one run: ratios, not absolute claims.

    python benchmarks/speed.py                        # everything below, CPU
    python benchmarks/speed.py --only channels-last   # one part: shards | attacks | ddp | channels-last

1. shards vs online teacher: DARD epoch time when every step runs the teacher (its DPGD view
   and two forwards) vs reading the same teacher outputs from shards; on digits (cnn_large ->
   cnn_small) and on CIFAR-shaped synthetic data (WRN-34-10 -> ResNet-18, few samples). The
   shards' own read throughput at scale: benchmarks/stream.py.
2. DPGD vs PGD: seconds per attack step (Dice vs CE inner loss, same model and batch).
3. DDP scaling: Ray Train images/s with 1 and 2 workers (needs Ray; skipped without it).
4. channels_last vs the default memory format on this device: PGD-10 SAT training steps at
   28x28 (batch 128) per architecture, interleaved rounds, and how far the two formats' logits
   and updated weights differ. dard.engine.place_model uses it where it wins (CHANNELS_LAST_CPU_MIN_CHANNELS).

Every figure prints with the machine; ``--json`` writes them (and ``.md`` beside it for part 4).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic import synthetic_table  # noqa: E402
from dard.config import Config  # noqa: E402
from dard.data import TrainBatch, load_splits, source_config  # noqa: E402
from dard.engine import resolve_device, train_epoch  # noqa: E402
from dard.losses import get_loss  # noqa: E402
from dard.modelfile import save_for  # noqa: E402
from dard.models import build, build_for  # noqa: E402
from dard.precompute import build_shards  # noqa: E402
from dard.shards import ShardSet  # noqa: E402
from dard.training import load_run_teacher, online_batches, shard_batches  # noqa: E402


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def _epoch(student, batches, cfg, device) -> float:
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    train_epoch(student, batches, opt, loss_cfg=cfg.loss, attack_cfg=cfg.attack, device=device, amp=cfg.optim.amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def shards_vs_online(name: str, cfg: Config, teacher_arch: str, device: torch.device) -> dict:
    """One DARD epoch with the online teacher vs from shards: the same data, models, loss and
    attacks; the shards built by `dard precompute`'s function from a teacher file."""
    with tempfile.TemporaryDirectory() as d:
        teacher_cfg = cfg.updated(model={"arch": teacher_arch, "kwargs": {}})
        torch.manual_seed(0)
        path = save_for(Path(d) / "teacher.pt", build_for(teacher_cfg.model, teacher_cfg.data), teacher_cfg)
        teacher = load_run_teacher(path, cfg)[0].to(device).eval()
        student = build_for(cfg.model, cfg.data).to(device)
        x0 = torch.rand(1, *cfg.data.image_shape, device=device)
        ratio_flops = flops(teacher, x0) / flops(student, x0)
        train = load_splits(cfg.data).train
        t_online = _epoch(copy.deepcopy(student), online_batches(train, cfg, 0, teacher, device), cfg, device)
        start = time.perf_counter()
        build_shards(cfg, path, f"{d}/shards", views=1, rows_per_part=len(train))
        t_pre = time.perf_counter() - start
        source, _ = shard_batches(ShardSet.open(f"{d}/shards"), cfg)
        batches = list(source(0))  # read up front: model time only
        t_shards = _epoch(student, iter(batches), cfg, device)
    n = sum(len(b.y) for b in batches)
    return {"name": name, "samples": len(train), "teacher": teacher_arch, "student": cfg.model.arch,
            "teacher_over_student_flops": ratio_flops, "online_epoch_s": t_online, "shards_epoch_s": t_shards,
            "speedup": t_online / t_shards, "precompute_s": t_pre, "student_rows_per_s": n / t_shards}


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
            run_cfg = cfg.updated(optim={"epochs": epochs}, run={"out_dir": d, "progress": False, "eval_every": 1000})
            result = train_distributed(run_cfg, shards, workers=n, name=f"scaling-{n}", storage_path=d)
            m = result.history[-1]
            out[f"{n}_workers_images_per_s"] = m["train_samples"] * n / m["train_seconds"]
    out["speedup_2_over_1"] = out.get("2_workers_images_per_s", 0) / out["1_workers_images_per_s"]
    return out


# (architecture, kwargs): the students and teachers of the 28x28 presets
CHANNELS_LAST_ARCHS = [("cnn_small", {"width": 0.25}), ("cnn_small", {}), ("cnn_medium", {}), ("cnn_large", {}),
                       ("resnet18", {}), ("mobilenetv2", {})]


def _sat_steps(model, batches, cfg, device) -> float:
    """Images/s of PGD SAT training steps over ``batches``."""
    loss_fn, opt = get_loss("sat"), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for x, y in batches:
        loss = loss_fn(model, TrainBatch(x, y).to(device), cfg.loss, cfg.attack).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def channels_last(device: torch.device, rounds: int = 3, batch: int = 128, steps: int = 10) -> list[dict]:
    """Per architecture: images/s of PGD-``steps`` SAT steps at 1x28x28 in the default format and
    in channels_last (the same initial weights; rounds interleaved so drift hits both), the median
    round's ratio; and the largest |difference| of their logits and of their weights after one step."""
    cfg = Config.for_dataset("fashion-mnist", loss={"method": "sat"}, attack={"steps": steps})
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(2)]
    rows = []
    for arch, kw in CHANNELS_LAST_ARCHS:
        torch.manual_seed(0)
        base = build(arch, 10, 1, **kw).to(device)
        models = {"default": base, "channels_last": copy.deepcopy(base).to(memory_format=torch.channels_last)}
        x = data[0][0].to(device)
        with torch.no_grad():
            logit_diff = (models["default"].eval()(x) - models["channels_last"].eval()(x)).abs().max().item()
        one = {k: copy.deepcopy(m) for k, m in models.items()}
        for m in one.values():
            torch.manual_seed(1)  # the same attack start in both
            _sat_steps(m.train(), data[:1], cfg, device)
        weight_diff = max((a - b).abs().max().item() for a, b in zip(one["default"].parameters(),
                                                                     one["channels_last"].parameters()))
        for m in models.values():
            _sat_steps(m.train(), data[:1], cfg, device)  # warm-up
        speeds = {k: [] for k in models}
        for _ in range(rounds):
            for k, m in models.items():
                speeds[k].append(_sat_steps(m, data, cfg, device))
        ratios = [c / d for c, d in zip(speeds["channels_last"], speeds["default"])]
        row = {"arch": arch + (f" width {kw['width']}" if kw else ""), "params": sum(p.numel() for p in base.parameters()),
               "default_images_per_s": statistics.median(speeds["default"]),
               "channels_last_images_per_s": statistics.median(speeds["channels_last"]),
               "ratio": statistics.median(ratios), "ratios": ratios, "max_logit_diff": logit_diff,
               "max_weight_diff_after_step": weight_diff}
        rows.append(row)
        print(f"{row['arch']:<22}{row['default_images_per_s']:>10.1f}{row['channels_last_images_per_s']:>15.1f}"
              f"{row['ratio']:>8.2f}x   logits {logit_diff:.1e}, weights after a step {weight_diff:.1e}", flush=True)
    return rows


def channels_last_md(result: dict) -> str:
    lines = ["# channels_last vs the default memory format, training on a CPU", "",
             f"- machine: {result['machine']}; {result['date']}",
             "- PGD-10 SAT training steps, 1x28x28 inputs, batch 128, 2 batches a round, 3 interleaved rounds; "
             "median round", "- `python benchmarks/speed.py --only channels-last --json "
             "benchmarks/results/speed-channels-last.json`", "",
             "| architecture | parameters | default images/s | channels_last images/s | ratio | rounds | "
             "max abs logit diff | max abs weight diff after a step |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in result["channels_last"]:
        lines.append(f"| {r['arch']} | {r['params']:,} | {r['default_images_per_s']:.1f} | "
                     f"{r['channels_last_images_per_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['max_logit_diff']:.1e} | "
                     f"{r['max_weight_diff_after_step']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("shards", "attacks", "ddp", "channels-last"), help="run one part")
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
        digits = Config.for_dataset("digits", data={"limit_train": args.digits_samples},
                                    model={"arch": "cnn_small"}, optim={"amp": args.amp, "batch_size": 64},
                                    run={"progress": False})
        with tempfile.TemporaryDirectory() as d:
            cifar = source_config("cifar-shaped", data={"source": synthetic_table(f"{d}/c.parquet", args.cifar_samples)},
                                  model={"arch": "resnet18"},
                                  optim={"amp": args.amp, "batch_size": min(32, args.cifar_samples)},
                                  run={"progress": False})
            rows = [shards_vs_online("digits", digits, "cnn_large", device),
                    shards_vs_online("cifar-shaped synthetic", cifar, "wrn34_10", device)]
        print(f"\n{'data':<24}{'teacher/student FLOPs':>22}{'online s/epoch':>16}{'shards s/epoch':>16}{'speedup':>9}"
              f"{'precompute s':>14}")
        for r in rows:
            print(f"{r['name']:<24}{r['teacher_over_student_flops']:>21.1f}x{r['online_epoch_s']:>16.2f}"
                  f"{r['shards_epoch_s']:>16.2f}{r['speedup']:>8.1f}x{r['precompute_s']:>14.2f}")
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
            cfg = Config.for_dataset("digits", run={"progress": False})
            with tempfile.TemporaryDirectory() as d:
                teacher = save_for(f"{d}/t.pt", build("cnn_large", 10, 1).eval(),
                                   cfg.updated(model={"arch": "cnn_large"}))
                build_shards(cfg, teacher, f"{d}/shards")
                r = ddp_scaling(f"{d}/shards", cfg)
            print(f"\nDDP on digits shards (Ray Train, CPU workers): 1 worker {r['1_workers_images_per_s']:.0f} img/s, "
                  f"2 workers {r['2_workers_images_per_s']:.0f} img/s, ratio {r['speedup_2_over_1']:.2f}")
            results["ddp_scaling"] = r
    if args.only in (None, "channels-last"):
        print(f"\n{'architecture':<22}{'default':>10}{'channels_last':>15}{'ratio':>8}   (images/s)")
        results["channels_last"] = channels_last(device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        if "channels_last" in results:
            Path(args.json).with_suffix(".md").write_text(channels_last_md(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
