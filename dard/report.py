"""Rendering a robustness report (:class:`dard.evaluate.Report`): JSON, CSV, eps-curve and
example plots, and one self-contained HTML page. The protocol itself is in ``dard/evaluate.py``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from dard.evaluate import CHECK_MARK, Report
from dard.logs import percent


def write_report(report: Report, out_dir: str | Path, stem: str = "robustness") -> dict[str, Path]:
    """Writes ``<stem>.json``, ``<stem>.csv`` and ``<stem>-eps.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attack", "accuracy", "samples", "seconds"])
        for name, acc in report.accuracy.items():
            w.writerow([name, f"{acc:.6f}", report.samples[name], f"{report.seconds.get(name, 0):.2f}"])
    if report.eps_curve:
        paths["png"] = plot_eps_curve(report.eps_curve, out_dir / f"{stem}-eps.png",
                                      title=report.meta.get("model", "model"))
    if report.examples is not None:
        paths["grid"] = plot_examples(report.examples, out_dir / f"{stem}-examples.png")
    paths["html"] = write_html(report, paths, out_dir / f"{stem}.html")
    return paths


def plot_examples(ex: dict, path: Path) -> Path:
    """Two rows of images: natural (top) and PGD-20 (bottom), each captioned 'true y / pred p (conf)';
    red = wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ex["y"])
    fig, axes = plt.subplots(2, n, figsize=(1.25 * n, 3.4), dpi=110, squeeze=False)
    for row, (key, pred, conf) in enumerate((("x", "pred", "conf"), ("x_adv", "pred_adv", "conf_adv"))):
        for i in range(n):
            ax = axes[row][i]
            img = ex[key][i].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ok = int(ex[pred][i]) == int(ex["y"][i])
            ax.set_title(f"true {int(ex['y'][i])}\npred {int(ex[pred][i])} ({100 * float(ex[conf][i]):.0f}%)", fontsize=9,
                         color="black" if ok else "red")
            ax.axis("off")
    axes[0][0].text(-0.6, 0.5, "natural", transform=axes[0][0].transAxes, rotation=90, va="center", fontsize=8)
    axes[1][0].text(-0.6, 0.5, "PGD-20", transform=axes[1][0].transAxes, rotation=90, va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_html(report: Report, paths: dict[str, Path], path: Path) -> Path:
    """One self-contained page: table, sanity checks, eps curve and example grid (images inlined)."""
    import base64
    import html

    def img(key: str) -> str:
        if key not in paths:
            return ""
        data = base64.b64encode(Path(paths[key]).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'

    e = html.escape
    rows = "".join(f"<tr><td>{e(n)}</td><td>{percent(a)}</td><td>{report.samples[n]}</td></tr>"
                   for n, a in report.accuracy.items())
    colour = {True: "green", False: "red", None: "grey"}
    checks = "".join(f'<li style="color:{colour[c.passed]}">{CHECK_MARK[c.passed].strip()} '
                     f"<b>{e(c.name)}</b>: {e(c.detail)}</li>" for c in report.checks)
    aa = report.autoattack
    aa_rows = "".join(f"<tr><td>after {e(k)}</td><td>{percent(v)}</td></tr>" for k, v in aa.get("per_attack", {}).items())
    aa_warn = "".join(f'<li style="color:red">WARNING {e(w)}</li>' for w in aa.get("warnings", []))
    m = report.meta
    s = report.settings
    top = report.headline()
    headline = (f"Robust accuracy {percent(top[1])} under {e(top[0])} on {top[2]} samples" if top else
                f"Natural accuracy {percent(report.accuracy.get('natural', float('nan')))} (no attack run)")
    prov = m.get("provenance", {})
    prov_items = "".join(f"<li>{e(k.replace('_', ' '))}: <code>{e(str(v))}</code></li>" for k, v in prov.items()
                         if v is not None)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>dard robustness report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{padding:2px 12px;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h2>Robustness report: {e(str(m.get("model", "")))}</h2>
<p style="font-size:1.4em"><b>{headline}</b></p>
<p>{e(str(m.get("arch", "")))} on {e(str(m.get("dataset", "")))} ({e(str(m.get("split", "")))} split);
L-inf eps {s.get("eps", 0):.4g}, step {s.get("step_size", 0):.4g}, inputs in [0, 1]</p>
{_model_facts(m)}
<table><tr><th>attack</th><th>accuracy</th><th>samples</th></tr>{rows}</table>
<h3>Sanity checks</h3><ul>{checks or "<li>not run</li>"}</ul>
{f'<h3>AutoAttack ({e(str(aa.get("version", "")))}), robust accuracy after each attack</h3><table>{aa_rows}</table><ul>{aa_warn or "<li>its checks raised no warning</li>"}</ul>' if aa else ""}
<h3>Accuracy vs eps (PGD-10)</h3>{img("png")}
<h3>Examples: natural (top) vs PGD-20 (bottom): true label, prediction (confidence); red = wrong</h3>{img("grid")}
<h3>Provenance</h3><ul>{prov_items or "<li>not recorded</li>"}</ul>
</body></html>"""
    Path(path).write_text(body)
    return Path(path)


def _model_facts(meta: dict) -> str:
    """The model's contract, when the report knows it: its input and its classes."""
    import html

    facts = []
    spec = meta.get("input") or {}
    if spec.get("shape"):
        threat = spec.get("threat_model") or {}
        facts.append(f"Input: float32 (N, {', '.join(map(str, spec['shape']))}) {html.escape(str(spec.get('channels', '')))}"
                     f" pixels in [{spec['range'][0]:g}, {spec['range'][1]:g}]"
                     + (f", trained for L-inf eps {threat['eps']:.4g}" if "eps" in threat else ""))
    if meta.get("classes"):
        facts.append("Classes (output order): " + ", ".join(html.escape(str(c)) for c in meta["classes"]))
    return "".join(f"<p>{f}</p>" for f in facts)


def plot_eps_curve(curve: list[tuple[float, float]], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot([e for e, _ in curve], [100 * a for _, a in curve], marker="o")
    ax.set_xlabel("eps (pixels in [0, 1], as in the header)")
    ax.set_ylabel("PGD-10 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
