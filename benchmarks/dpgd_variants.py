"""DPGD variants vs PGD at equal steps on trained models, whole test split (the method issue's check).

    python benchmarks/dpgd_variants.py                     # models from benchmarks/methods.py's work dir
    python benchmarks/dpgd_variants.py --models a.pt b.pt  # any dard model files

For each model: PGD-10 (CE), DPGD-10 for every inner loss x step schedule (same eps, step,
random start and seed), and AutoAttack standard. Writes ``benchmarks/results/dpgd-variants.md``.
The claim checked: each DPGD variant is at least as strong as PGD-10 (accuracy <=), AutoAttack
at least as strong as both; the table says by how much, and where a variant is weaker.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dard.attacks import dpgd, pgd  # noqa: E402
from dard.attacks.autoattack import autoattack  # noqa: E402
from dard.config import Config  # noqa: E402
from dard.data import load_splits, to_float  # noqa: E402
from dard.engine import correct_under  # noqa: E402
from dard.models import load_model  # noqa: E402

LOSSES = ("dice", "ce", "dice+ce", "cw")
SCHEDULES = ("constant", "cosine", "apgd")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = REPO / "runs" / "bench-methods"
    p.add_argument("--models", nargs="*", default=[str(work / "teacher" / "model.pt"), str(work / "DARD-s0" / "model.pt"),
                                                 str(work / "TRADES-s0" / "model.pt"), str(work / "SAT-s0" / "model.pt"),
                                                 str(work / "RSLAD-s0" / "model.pt")])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--aa-limit", type=int, default=None, help="AutoAttack on the first N (default: all)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dpgd-variants.md"))
    args = p.parse_args()
    cfg = Config.for_dataset("digits")
    test = load_splits(cfg.data).test
    x, y = to_float(test.images), test.labels
    eps, step = cfg.attack.eps, cfg.attack.step_size
    variants = [(l, s) for l in LOSSES for s in SCHEDULES]
    header = ["model", "natural", f"PGD-{args.steps}"] + [f"{l}/{s}" for l, s in variants] + ["AutoAttack"]
    lines = [f"# DPGD-{args.steps} variants vs PGD-{args.steps}, digits test split ({len(y)} samples), eps {eps}, "
             f"step {step}, accuracy %", "",
             f"- date {time.strftime('%Y-%m-%d')}, CPU, command `python benchmarks/{Path(__file__).name} "
             f"{' '.join(sys.argv[1:])}`; DPGD columns are inner loss/step schedule, same random start seed as PGD",
             "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for path in args.models:
        if not Path(path).exists():
            print(f"skipping {path}: not found (run benchmarks/methods.py first)")
            continue
        model, meta = load_model(path)
        name = f"{Path(path).parent.name} ({meta['arch']})"
        nat = correct_under(model, x, y).float().mean().item()
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        acc_pgd = correct_under(model, x, y, lambda m, a, b: pgd(m, a, b, eps, step, args.steps, generator=gen())
                                ).float().mean().item()
        row = [name, f"{100 * nat:.1f}", f"{100 * acc_pgd:.1f}"]
        weaker = []
        for loss, schedule in variants:
            acc = correct_under(model, x, y, lambda m, a, b: dpgd(m, a, b, eps=eps, step_size=step, steps=args.steps,
                                                                  loss=loss, schedule=schedule, generator=gen())
                                ).float().mean().item()
            row.append(f"{100 * acc:.1f}" + ("*" if acc > acc_pgd else ""))
            if acc > acc_pgd:
                weaker.append(f"{loss}/{schedule}")
        n = args.aa_limit or len(y)
        aa = autoattack(model, x[:n], y[:n], eps=eps, num_classes=10).accuracy
        row.append(f"{100 * aa:.1f}")
        lines.append("| " + " | ".join(row) + " |")
        print(" | ".join(row), flush=True)
    lines += ["", "`*`: weaker than PGD at equal steps (higher accuracy)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
