"""A model card, written only from facts the project has: what the model is for and takes, the
threat model it was trained for, its validation numbers (the epoch it holds), the attack suite's
numbers with their sample counts (once evaluated), how it was trained and from what, and what it
is not tested against. It is the description of the model's MLflow run, of its registered
version, and of the registered model while it is the champion."""
from __future__ import annotations

from typing import Any

from dard.logs import percent

ATTACK_NAMES = {"natural": "natural", "fgsm": "FGSM", "pgd20": "PGD-20", "bim10": "BIM-10", "tpgd10": "T-PGD-10",
                "cw20": "CW∞-20", "dpgd20": "DPGD-20", "square": "Square", "autoattack": "AutoAttack (standard)"}


def model_card(mf, evaluation: dict[str, Any] | None = None) -> str:
    """Markdown for a loaded model file (:class:`dard.modelfile.ModelFile`); ``evaluation``: a
    report's dict (``dard evaluate``), whose numbers then appear with their sample counts."""
    cfg, meta = mf.config, mf.meta
    c, h, w = mf.input["shape"]
    eps = cfg.attack.eps
    classes = ", ".join(mf.classes[:20]) + (f", ... ({len(mf.classes)} in all)" if len(mf.classes) > 20 else "")
    lines = [f"### {mf.arch} for {cfg.data.dataset}, robust to L∞ perturbations of {eps:.4g}", "",
             f"**Intended use.** Classify {'grey' if c == 1 else 'RGB'} images of {h}x{w} pixels into {len(mf.classes)} "
             f"classes where an adversary may change every pixel by up to {eps:.4g} (pixels on [0, 1]; "
             f"{eps * 255:.1f}/255).", "",
             f"**Input.** float32 (N, {c}, {h}, {w}), pixels in [0, 1] (normalisation is inside the model); output: "
             f"logits (N, {len(mf.classes)}). Classes, in output order: {classes}.", ""]
    metrics, epoch = meta.get("final_metrics") or {}, meta.get("selected_epoch")
    k = cfg.run.eval_pgd_steps
    if "val_robust_acc" in metrics:
        lines += [f"**Validation** (the epoch it holds: {epoch + 1} of {cfg.optim.epochs}, on "
                  f"{metrics.get('val_samples', '?')} validation samples): natural {percent(metrics['val_natural_acc'])}, "
                  f"PGD-{k} {percent(metrics['val_pgd_acc'])}, surviving PGD-{k} and CW-{k} "
                  f"{percent(metrics['val_robust_acc'])}.", ""]
    if evaluation:
        acc, samples = evaluation["accuracy"], evaluation["samples"]
        split = (evaluation.get("meta") or {}).get("split", "test")
        lines += [f"**{split.capitalize()} split** (eps {evaluation['settings']['eps']:.4g}; `dard evaluate`):", "",
                  "| attack | accuracy | samples |", "|---|---|---|"]
        lines += [f"| {ATTACK_NAMES.get(a, a)} | {percent(v)} | {samples[a]} |" for a, v in acc.items()]
        lines.append("")
    else:
        lines += ["**Test split:** not evaluated yet (`dard evaluate --model models:/...` adds the attack suite here).", ""]
    teacher, shards, data = meta.get("teacher") or {}, meta.get("shards") or {}, meta.get("data") or {}
    o = cfg.optim
    budget = (f"{o.epochs} epochs" + (f" x {o.steps_per_epoch} steps" if o.steps_per_epoch else "")
              + f", batch {o.batch_size}, lr {o.lr:g} ({o.lr_schedule})")
    lines += [f"**Training.** {cfg.loss.method} ({_objective(cfg)}) under PGD/DPGD-{cfg.attack.steps} at eps "
              f"{eps:.4g}, {budget}"
              + (f"; data {data['name']} ({data['samples']} samples, digest {data['digest'][:12]})" if data else "")
              + (f"; the teacher's soft labels from shards {shards.get('fingerprint')}" if shards else "")
              + (f"; teacher {teacher.get('arch')} (sha256 {str(teacher.get('sha256'))[:12]})" if teacher else "")
              + ". `dard lineage` walks it back.", ""]
    untested = ["other L∞ radii than the one above", "L2 or patch attacks", "natural corruptions and distribution "
                "shift", "inputs outside [0, 1] or of another size"]
    lines += ["**Limitations.** Robust only as measured: against L∞ attacks at the eps above, on the samples counted "
              "above" + (" (AutoAttack on a subset of them)" if evaluation and "autoattack" in evaluation["samples"]
                         and evaluation["samples"]["autoattack"] < evaluation["samples"].get("natural", 0) else "")
              + "; not tested against " + ", ".join(untested) + ". A distilled student inherits its teacher's errors"
              + (", and pool images carry the teacher's labels" if cfg.data.labeled or cfg.data.pool else "") + "."]
    return "\n".join(lines)


def _objective(cfg) -> str:
    loss = cfg.loss
    if loss.method != "dard":
        return {"sat": "PGD adversarial training", "trades": f"TRADES, beta {loss.trades_beta:g}",
                "natural": "standard training, not robust", "ard": "ARD", "rslad": "RSLAD"}.get(loss.method, loss.method)
    weights = ", ".join(f"{name} {getattr(loss, name):g}" for name in ("w_adv", "w_rob", "w_nat", "w_ce", "w_ce_adv")
                        if getattr(loss, name))
    return f"robust target {loss.rob_target}, {weights}, {loss.divergence} at temperature {loss.temperature:g}"
