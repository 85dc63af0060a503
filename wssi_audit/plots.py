"""Pictures of a report: one PNG figure (`--plot`) and a standalone HTML report (`--html`).

The figure has three panels: per-layer log10 ||W|| by depth coloured by chain, the imbalance of
every chain of 2+ layers, and the three input-gradient figures side by side. matplotlib is an
optional extra (`pip install wssi-audit[plots]`); without it these raise one clear `InputError`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from .errors import InputError
from .render import summary_lines
from .report import Report

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def require_matplotlib() -> None:
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'wssi-audit[plots]' (or pip install matplotlib)") from None
    return plt


def figure_png(report: Report, dpi: int = 110) -> bytes:
    """The three panels as PNG bytes."""
    plt = _pyplot()
    fig, (norms, imbalance, gradient) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    try:
        _layer_norms(norms, report)
        _imbalance(imbalance, report)
        _gradient(gradient, report)
        fig.suptitle(f"wssi-audit: {report.model.source}", fontsize=11)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _layer_norms(ax: Any, report: Report) -> None:
    chains = sorted({layer.chain for layer in report.layers})
    for chain in chains:
        points = [(i, layer.log10_frobenius) for i, layer in enumerate(report.layers) if layer.chain == chain]
        shown = [(i, v) for i, v in points if _finite(v)]
        color = COLORS[chain % len(COLORS)]
        if shown:
            ax.plot(*zip(*shown), "o-", color=color, ms=4, lw=1, label=f"chain {chain}" if len(chains) <= 9 else None)
    broken = [i for i, layer in enumerate(report.layers) if layer.status != "ok"]
    for i in broken:
        ax.axvline(i, color="red", lw=0.8, ls=":")
    ax.set_xlabel("weight layer (depth order)")
    ax.set_ylabel("log10 ||W|| (BatchNorm folded)")
    ax.set_title("per-layer norms, coloured by chain" + (" (dotted: zero / NaN layers)" if broken else ""), fontsize=9)
    if 1 < len(chains) <= 9:
        ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)


def _imbalance(ax: Any, report: Report) -> None:
    chains = [c for c in report.chains if len(c.layers) > 1 and _finite(c.imbalance_decades)]
    if chains:
        ax.bar(
            [str(c.id) for c in chains],
            [c.imbalance_decades for c in chains],
            color=[COLORS[c.id % len(COLORS)] for c in chains],
        )
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no chain of 2+ layers", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("chain")
    ax.set_ylabel("imbalance (decades)")
    ax.set_title("imbalance per chain (dashed: 1 decade, worth balancing)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")


def _gradient(ax: Any, report: Report) -> None:
    g = report.summary.gradient
    labels = ["Frobenius\nbound", "certified\nbound", "measured"]
    values = [g.log10_frobenius_bound, g.log10_certified_bound, g.log10_measured]
    shown = [v if _finite(v) else 0.0 for v in values]
    bars = ax.bar(labels, shown, color=["#7f7f7f", "#1f77b4", "#2ca02c"])
    for bar, value in zip(bars, values):
        text = f"{value:.2f}" if _finite(value) else "n/a"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("log10 ||dy/dx||")
    ax.set_title("input-gradient figures", fontsize=9)
    ax.grid(alpha=0.3, axis="y")


def report_html(report: Report) -> str:
    """A standalone HTML page: the summary, the findings, the figure (embedded) and the chains."""
    image = base64.b64encode(figure_png(report)).decode("ascii")
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_lines(report))
    findings = (
        "".join(
            f"<tr class='{e(f.severity)}'><td>{e(f.severity)}</td><td>{e(f.message)}</td><td>{e(f.action)}</td></tr>"
            for f in report.findings
        )
        or "<tr><td colspan='3'>none: the weight scales look healthy</td></tr>"
    )
    layer_of = {layer.name: layer for layer in report.layers}
    chains = "".join(
        "<tr>"
        f"<td>{c.id}</td><td>{e(', '.join(c.layers))}</td>"
        f"<td>{e(' '.join(_num(layer_of[n].log10_frobenius) for n in c.layers))}</td>"
        f"<td>{_num(c.log10_intrinsic_norm)}</td><td>{_num(c.imbalance_decades)}</td><td>{e(c.verification)}</td>"
        "</tr>"
        for c in report.chains
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wssi-audit: {e(report.model.source)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.error td:first-child {{ color: #b00; font-weight: bold; }} tr.warning td:first-child {{ color: #a60; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>wssi-audit report</h1>
<table>{rows}</table>
<h2>Findings</h2>
<table><tr><th>severity</th><th>finding</th><th>what to do</th></tr>{findings}</table>
<h2>Figures</h2>
<img alt="per-layer norms, imbalance per chain, input-gradient figures" src="data:image/png;base64,{image}">
<h2>Homogeneous chains</h2>
<table><tr><th>id</th><th>layers</th><th>log10 ||W||</th><th>log10 N</th><th>imbalance</th><th>verified</th></tr>
{chains}</table>
<p>wssi-audit {e(report.tool_version)}, report schema 2.</p>
</body></html>
"""


def _num(value: float | None) -> str:
    return f"{value:.2f}" if _finite(value) else "–"
