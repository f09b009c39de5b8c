"""The test suite's teacher (``trained_models["teacher"]`` in tests/conftest.py), its candidates
side by side in one run: each trained as the fixture trains it (TRADES on digits, the fixture's
settings), then the DARD student of ``test_dard_student_is_more_robust_than_a_natural_student``
(6 epochs, the online teacher) against the fixture's natural student. Every test that builds
shards from this teacher pays its forward and DPGD cost too. Writes
``benchmarks/results/suite-teacher.md`` and ``.json``.

    python benchmarks/suite_teacher.py              # about 2 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_fit(**sections) -> tuple[dict, float]:
    """``fit`` of the digits config the tests use (``teacher_path`` passed through); (result, seconds)."""
    from dard.training import fit
    from tests.conftest import digits_config

    teacher = sections.pop("teacher_path", None)
    start = time.perf_counter()
    result = fit(digits_config(tempfile.mkdtemp(prefix="suite-teacher-"), **sections), teacher_path=teacher)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="cnn_large:6,cnn_medium:6", help="arch:epochs, comma-separated")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "suite-teacher"))
    args = parser.parse_args()

    natural, natural_s = timed_fit(model={"arch": "cnn_small"}, loss={"method": "natural"}, optim={"epochs": 12})
    rows = []
    for arch, epochs in (item.split(":") for item in args.teachers.split(",")):
        teacher, teacher_s = timed_fit(model={"arch": arch}, loss={"method": "trades"}, optim={"epochs": int(epochs)})
        student, student_s = timed_fit(loss={"method": "dard"}, optim={"epochs": 6}, teacher_path=teacher["model_path"])
        rows.append({"arch": arch, "epochs": int(epochs), "teacher_s": teacher_s,
                     "teacher_val_natural": teacher["val_natural_acc"], "teacher_val_pgd": teacher["val_pgd_acc"],
                     "student_s": student_s, "student_val_pgd": student["val_pgd_acc"],
                     "natural_student_val_pgd": natural["val_pgd_acc"]})
        print(rows[-1], flush=True)
    import torch

    facts = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "torch": torch.__version__,
             "threads": torch.get_num_threads(), "command": "python benchmarks/suite_teacher.py",
             "natural_student_s": natural_s}
    Path(f"{args.out}.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1) + "\n")
    lines = [f"# The test suite's teacher ({time.strftime('%Y-%m-%d')})", "",
             f"`{facts['command']}` on {facts['machine']}, torch {facts['torch']} ({facts['threads']} threads), "
             "nothing else running. Digits (the preset's splits), validation PGD-10 as training reports it, "
             "one seed. The teacher: TRADES, as `trained_models` trains it; the student: DARD cnn_small, 6 "
             "epochs, the online teacher, as `test_dard_student_is_more_robust_than_a_natural_student` trains "
             "it (which asks for 10 points over the natural student's "
             f"{100 * natural['val_pgd_acc']:.1f} %).", "",
             "| teacher | epochs | train | val natural | val PGD-10 | DARD student train | student val PGD-10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arch']} | {r['epochs']} | {r['teacher_s']:.1f} s | {100 * r['teacher_val_natural']:.1f} % | "
              f"{100 * r['teacher_val_pgd']:.1f} % | {r['student_s']:.1f} s | {100 * r['student_val_pgd']:.1f} % |"
              for r in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
