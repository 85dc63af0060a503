"""Human renderings of a `Report`: rich tables for the terminal, and Markdown."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .report import ChainRecord, LayerRecord, Report


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if math.isnan(value):
        return "non-finite"
    return f"{value:.{digits}f}"


def _chain_lines(chain: ChainRecord, layer_of: dict[str, LayerRecord]) -> tuple[list[str], list[str]]:
    """The chains table's layer lines and their norms; a carried layer (its bias scales with the
    chain, its weight stays) on a line of its own under the layer carrying it, without a norm."""
    names, logs = [], []
    for name in chain.layers:
        names.append(name)
        logs.append(_layer_log(layer_of[name]))
        for rider in chain.carried.get(name, []):
            names.append(f"  + {rider} (carried)")
            logs.append("")
    return names, logs


def _layer_log(layer: LayerRecord) -> str:
    """A layer's log10 norm, or what it is instead: an all-zero layer, or one holding NaN/Inf."""
    return {"zero": "zero", "non_finite": "non-finite"}.get(layer.status) or _fmt(layer.log10_frobenius, 2)


VERIFICATION_STYLE = {
    "verified": ("yes", "green"),
    "failed": ("FAILED", "bold red"),
    "unverifiable": ("unverifiable", "yellow"),
    "trivial": ("–", "dim"),
    "not_run": ("not run", "dim"),
}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _verification(status: str) -> Text:
    label, style = VERIFICATION_STYLE.get(status, (status, ""))
    return Text(label, style=style)


def _self_check_line(report: Report) -> str:
    s = report.summary
    tally = s.verification
    checked = sum(n for k, n in tally.items() if k != "trivial")
    if s.all_verified is None:
        return f"not run ({s.verification_note or 'no example input'})" if checked else "no chain of 2+ layers"
    parts = [f"{tally[k]} {k.replace('_', ' ')}" for k in ("verified", "failed", "unverifiable") if tally.get(k)]
    line = ("all chains verified" if s.all_verified else "FAILED" if report.failed_chains else "INCOMPLETE") + (
        f" ({', '.join(parts)}" if parts else " ("
    )
    if s.max_verification_error is not None:
        line += f"; max rel. error {s.max_verification_error:.1e} in {s.verification_dtype}"
    return line + ")"


def _gradient_value(value: float | None, note: str) -> str:
    return _fmt(value) if value is not None else f"– ({note})" if note else "–"


def summary_lines(report: Report) -> list[tuple[str, str]]:
    s, t, g = report.summary, report.trace, report.summary.gradient
    lines = [
        ("model", f"{report.model.source} [{report.model.format}], {report.model.parameters:,} parameters"),
        ("trace", f"{t.method}, {t.nodes} ops, coverage {t.coverage:.1%}"),
        ("chains", f"{s.chains} ({s.residual_blocks} residual blocks)"),
        ("homogeneous weights", f"{s.homogeneous_weight_fraction:.1%} of weight-layer parameters"),
        ("max imbalance", f"{_fmt(s.max_imbalance_decades, 2)} decades"),
        ("log10 gradient: Frobenius bound", _gradient_value(g.log10_frobenius_bound, g.frobenius_note)),
        ("log10 gradient: certified bound", _gradient_value(g.log10_certified_bound, g.certified_note)),
        ("log10 gradient: measured", _gradient_value(g.log10_measured, g.measured_note)),
    ]
    if s.log10_path2_norm is not None:
        lines.append(("log10 path-2 norm", _fmt(s.log10_path2_norm)))
    lines.append(("self-check", _self_check_line(report)))
    if s.verification_note and s.all_verified is not None:
        lines.append(("note", s.verification_note))
    return lines


def render_console(report: Report, console: Console, *, layers: bool = False, explain: bool = False) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in summary_lines(report):
        grid.add_row(key, Text(value, style="bold red" if "FAILED" in value else ""))
    console.print(Panel(grid, title="wssi-audit", title_align="left", border_style="cyan"))

    if report.inconsistent:
        console.print(
            Panel(
                Text(
                    next(f.message for f in report.findings if f.code.endswith("check_failed")) + ". Please report it."
                ),
                title="ANALYZER INCONSISTENCY",
                border_style="bold red",
            )
        )

    layer_of = {layer.name: layer for layer in report.layers}
    chains = Table(title="Homogeneous chains", title_justify="left", show_lines=True)
    chains.add_column("id", justify="right")
    chains.add_column("layers", overflow="fold")
    chains.add_column("log10 ‖W‖", justify="right")
    for column in ("log10 N", "imbalance", "wd excess", "verified"):
        chains.add_column(column, justify="right")
    for chain in report.chains:
        names, logs = _chain_lines(chain, layer_of)
        chains.add_row(
            str(chain.id),
            Text("\n".join(names)),
            "\n".join(logs),
            _fmt(chain.log10_intrinsic_norm, 2),
            _fmt(chain.imbalance_decades, 2),
            _fmt(chain.wd_excess, 2),
            _verification(chain.verification),
        )
    console.print(chains)

    if report.residual_blocks:
        blocks = Table(title="Residual blocks", title_justify="left")
        for column in ("id", "shortcut", "branch", "log10 branch norm"):
            blocks.add_column(column)
        for block in report.residual_blocks:
            shortcut = block.shortcut if block.shortcut_weight is None else f"projection {block.shortcut_weight}"
            blocks.add_row(
                str(block.id), Text(shortcut), Text("\n".join(block.branch_weights)), _fmt(block.log10_branch_norm, 2)
            )
        console.print(blocks)

    if layers:
        table = Table(title="Layers", title_justify="left")
        for column in ("layer", "kind", "shape", "||W||_F", "||W||_2 (est.)", "||b||", "folded BN"):
            table.add_column(column)
        for layer in report.layers:
            table.add_row(
                layer.name,
                layer.kind,
                "x".join(map(str, layer.shape)),
                _fmt(layer.frobenius, 4),
                _fmt(layer.spectral, 4),
                _fmt(layer.bias_norm, 4),
                layer.folded_bn or "",
            )
        console.print(table)

    if report.barriers:
        barriers = Table(title="Barriers", title_justify="left")
        barriers.add_column("node")
        barriers.add_column("op")
        barriers.add_column("reason")
        for barrier in report.barriers:
            barriers.add_row(Text(barrier.node), Text(barrier.op), Text(barrier.reason))
        console.print(barriers)

    if report.trace.unanalyzed:
        unknown = Table(title="Not analysed (counted against coverage)", title_justify="left", border_style="yellow")
        unknown.add_column("node")
        unknown.add_column("reason")
        for item in report.trace.unanalyzed:
            unknown.add_row(Text(item.node), Text(item.reason))
        console.print(unknown)

    render_findings(report, console)
    if explain:
        render_glossary(console)


def render_findings(report: Report, console: Console) -> None:
    if not report.findings:
        console.print(Text("Findings: none. The weight scales look healthy.", style="green"))
        return
    table = Table(title="Findings", title_justify="left", show_lines=True)
    table.add_column("severity")
    table.add_column("finding", ratio=3)
    table.add_column("what to do", ratio=2)
    for finding in report.findings:
        table.add_row(
            Text(finding.severity, style=SEVERITY_STYLE.get(finding.severity, "")),
            Text(finding.message),
            Text(finding.action),
        )
    console.print(table)


def render_glossary(console: Console) -> None:
    from .glossary import GLOSSARY

    table = Table(title="What the numbers mean", title_justify="left", show_lines=True)
    table.add_column("term", style="bold")
    table.add_column("meaning")
    table.add_column("normal range")
    for term, meaning, normal in GLOSSARY:
        table.add_row(Text(term), Text(meaning), Text(normal))
    console.print(table)


def render_markdown(report: Report) -> str:
    out = ["# wssi-audit report", ""]
    out += ["| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in summary_lines(report)]
    layer_of = {layer.name: layer for layer in report.layers}
    out += [
        "",
        "## Homogeneous chains",
        "",
        "| id | layers | log10 norms | log10 N | imbalance | wd excess | verified |",
    ]
    out += ["|---:|---|---|---:|---:|---:|---|"]
    for chain in report.chains:
        norms = " ".join(_layer_log(layer_of[n]) for n in chain.layers)
        verified = VERIFICATION_STYLE.get(chain.verification, (chain.verification, ""))[0]
        verified = "**FAILED**" if chain.verification == "failed" else verified
        riders = [f"{name} (+ {', '.join(chain.carried[name])} carried)" if name in chain.carried else name
                  for name in chain.layers]  # fmt: skip
        out.append(
            f"| {chain.id} | {', '.join(riders)} | {norms} | {_fmt(chain.log10_intrinsic_norm, 2)} | "
            f"{_fmt(chain.imbalance_decades, 2)} | {_fmt(chain.wd_excess, 2)} | {verified} |"
        )
    if report.residual_blocks:
        out += ["", "## Residual blocks", "", "| id | shortcut | branch | log10 branch norm |", "|---:|---|---|---:|"]
        for block in report.residual_blocks:
            shortcut = block.shortcut if block.shortcut_weight is None else f"projection `{block.shortcut_weight}`"
            out.append(
                f"| {block.id} | {shortcut} | {', '.join(block.branch_weights)} | {_fmt(block.log10_branch_norm, 2)} |"
            )
    out += [
        "",
        "## Layers",
        "",
        "| layer | kind | shape | ‖W‖_F | ‖W‖_2 (est.) | ‖b‖ | folded BN |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for layer in report.layers:
        out.append(
            f"| {layer.name} | {layer.kind} | {'x'.join(map(str, layer.shape))} | {_fmt(layer.frobenius, 4)} | "
            f"{_fmt(layer.spectral, 4)} | {_fmt(layer.bias_norm, 4)} | {layer.folded_bn or ''} |"
        )
    if report.barriers:
        out += ["", "## Barriers", "", "| node | op | reason |", "|---|---|---|"]
        out += [f"| {b.node} | {b.op} | {b.reason} |" for b in report.barriers]
    if report.trace.unanalyzed:
        out += ["", "## Not analysed", "", "| node | reason |", "|---|---|"]
        out += [f"| {u.node} | {u.reason} |" for u in report.trace.unanalyzed]
    out += ["", "## Findings", ""]
    if not report.findings:
        out.append("None: the weight scales look healthy.")
    else:
        out += ["| severity | finding | what to do |", "|---|---|---|"]
        out += [f"| {f.severity} | {f.message} | {f.action} |" for f in report.findings]
    return "\n".join(out) + "\n"


def render_text(report: Report, *, layers: bool = False, explain: bool = False, width: int = 120) -> str:
    """The terminal report as plain text (no colour codes), for --output files."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    render_console(report, console, layers=layers, explain=explain)
    return buffer.getvalue()
