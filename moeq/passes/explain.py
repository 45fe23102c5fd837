"""``moeq.explain()``: what the pass rewrote, with which quantizers and statistics, and what it did not.

The report is a table per expert GEMM (FQN, form matched, formats, per-expert coverage, amax summary),
the experts flagged during ``finalize()``, and every candidate node that was *not* rewritten with its
reason. ``to_networkx()`` / ``to_dot()`` / ``to_svg()`` draw the rewritten regions.
"""

from __future__ import annotations

import dataclasses
import html
import shutil
import subprocess
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeq.config import QuantConfig

if TYPE_CHECKING:
    import networkx as nx

    from moeq.passes.find import SkippedCandidate
    from moeq.state import ExpertQuantState, ModelQuantState

__all__ = ["Explanation", "GraphReport", "LoweringLines", "RewrittenGemm", "format_table"]

#: ``(mode, config, has_module_lists, width) -> lines``: the report's "Lowering" section. The lowering describes itself
#: (``moeq.lowering.describe``) and ``moeq.explain`` hands it in, so this module imports nothing from the lowering.
LoweringLines = Callable[[str, QuantConfig, bool, int], list[str]]
#: the width the report wraps its prose to (its tables' lines are about this wide)
REPORT_WIDTH = 116


_COLORS = {"parameter": "#dae8fc", "quantizer": "#f8cecc", "gemm": "#d5e8d4", "view": "#f5f5f5", "input": "#fff2cc"}


@dataclass
class RewrittenGemm:
    fqn: str
    form: str
    node: str
    num_experts: int
    weight_shape: tuple[int, ...]
    expert_dim: int
    contraction_dim: int
    path: list[str] = field(default_factory=list)
    input_node: str = "x"
    offs_node: str | None = None
    #: inside an activation-checkpointed region (:mod:`moeq.passes.inline_checkpoint`): recomputed in the backward
    recomputed: bool = False


@dataclass
class GraphReport:
    """What one pass over one graph did."""

    kind: str
    rewritten: list[RewrittenGemm]
    skipped: list[SkippedCandidate]

    def signature(self) -> str:
        """Identical graphs (e.g. recompiles for a new mode) collapse into one report."""
        parts = (
            [self.kind] + [f"{r.fqn}:{r.node}" for r in self.rewritten] + [f"{s.node}:{s.reason}" for s in self.skipped]
        )
        return "|".join(parts)


def _input_amax_cell(config: QuantConfig, input_amax: list[float], tokens: list[int]) -> str:
    """The "input amax" column: none for weight-only configs, "dynamic" for per-token scales, else the range."""
    if config.activation is None:
        return "- (W only)"
    if config.dynamic_activations:
        return "dynamic"
    return _range(input_amax) if any(tokens) else "-"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _range(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return _fmt(lo) if lo == hi else f"{_fmt(lo)}..{_fmt(hi)}"


class Explanation:
    """The report object returned by :func:`moeq.explain`; ``str()`` gives the tables."""

    def __init__(self, state: ModelQuantState, lowering: LoweringLines | None = None) -> None:
        self.state = state
        #: what writes the "Lowering" section (``moeq.lowering.describe.lowering_lines``; ``moeq.explain`` passes it)
        self.lowering = lowering
        rewritten: dict[str, RewrittenGemm] = {}
        skipped: dict[tuple[str, str], SkippedCandidate] = {}
        recomputed: set[str] = set()
        self.graph_kinds: list[str] = []
        for report in state.reports.values():
            self.graph_kinds.append(report.kind)
            for r in report.rewritten:
                rewritten.setdefault(r.fqn, r)
                if r.recomputed:
                    recomputed.add(r.fqn)
            for s in report.skipped:
                skipped.setdefault((s.node, s.reason), s)
        for fqn, compiled_for in state.reused_graphs.items():  # graphs Dynamo reused for other layers
            if compiled_for in rewritten and fqn not in rewritten:
                rewritten[fqn] = dataclasses.replace(rewritten[compiled_for], fqn=fqn)
        self.rewritten: list[RewrittenGemm] = sorted(rewritten.values(), key=lambda r: r.fqn)
        self.skipped: list[SkippedCandidate] = list(skipped.values())
        #: rewritten weights whose GEMMs some graph runs inside an activation-checkpointed region
        self.recomputed: list[str] = sorted(recomputed)
        #: rewritten weight -> GEMMs on it that some other compiled graph left as they were (those run unquantized)
        self.partly_rewritten: dict[str, int] = dict(
            Counter(s.weight_fqn for s in self.skipped if s.weight_fqn in rewritten)
        )

    # -- data ------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One dict per rewritten expert GEMM with its live statistics."""
        out = []
        for r in self.rewritten:
            s: ExpertQuantState = self.state[r.fqn]
            tokens = s.tokens_per_expert.tolist()
            out.append(
                {
                    "fqn": r.fqn,
                    "form": r.form,
                    "experts": r.num_experts,
                    "weight": s.config.weight,
                    "activation": s.config.activation or "-",
                    "contraction_dim": r.contraction_dim,
                    "covered": sum(1 for t in tokens if t > 0),
                    "tokens": tokens,
                    "weight_amax": s.weight_amax.tolist(),
                    "input_amax": s.input_amax.tolist(),
                    "observed_input_amax": s.observed_input_amax.tolist(),
                    "flags": dict(s.flags),
                    "stored_bytes": sum(
                        t.numel() * t.element_size() for t in (s.frozen_data, s.frozen_scale, s.frozen_block_scale)
                    ),
                }
            )
        return out

    # -- text ------------------------------------------------------------------------------------
    def __str__(self) -> str:
        state = self.state
        table = self.rows()
        status = "finalized" if state.finalized else f"mode={state.mode}"
        if state.mode == "deploy":
            stored = sum(row["stored_bytes"] for row in table)
            status = f"deploy: expert weights stored quantized, {stored / 2**20:.2f} MiB"
        head = (
            f"moeq: {len(self.rewritten)} expert GEMMs rewritten, {len(self.skipped)} candidates not rewritten "
            f"[{state.config.name}, act_scale={state.config.act_scale}"
            + (f", calib={state.config.calib}" if state.config.calib != "routed" else "")
            + f", {status}]"
        )
        header = [
            "expert weight",
            "form",
            "E",
            "W/A",
            "K dim",
            "coverage",
            "tokens min/max",
            "weight amax",
            "input amax",
            "flags",
        ]
        rows = []
        for row in table:
            tokens = row["tokens"]
            input_amax = row["input_amax"] if state.finalized else row["observed_input_amax"]
            rows.append(
                [
                    row["fqn"],
                    row["form"],
                    str(row["experts"]),
                    f"{row['weight']}/{row['activation']}",
                    str(row["contraction_dim"]),
                    f"{row['covered']}/{row['experts']}",
                    f"{min(tokens)}/{max(tokens)}" if tokens else "-",
                    _range(torch.tensor(row["weight_amax"]).flatten().tolist()) if state.finalized else "-",
                    _input_amax_cell(state.config, input_amax, tokens),
                    str(len(row["flags"])) if row["flags"] else "",
                ]
            )
        parts = [head]
        if not state.reports:
            parts.append(
                textwrap.fill(
                    "Nothing rewritten yet: run the model compiled with torch.compile(model, backend='moeq') once "
                    "(or rewrite a traced graph with moeq.quantize_graph); this report then lists each expert GEMM.",
                    width=REPORT_WIDTH,
                )
            )
        if self.lowering is not None and (state.finalized or state.mode == "deploy"):
            from moeq.passes.find import MODULE_LIST_FORM

            mode = "deploy" if state.mode == "deploy" else "qat"
            module_lists = any(row["form"].startswith(MODULE_LIST_FORM) for row in table)
            parts += ["", *self.lowering(mode, state.config, module_lists, REPORT_WIDTH)]
        parts += ["", format_table(header, rows)]
        flagged = [(row["fqn"], e, note) for row in table for e, note in sorted(row["flags"].items())]
        if flagged:
            parts += ["", "Flagged experts:"]
            parts += [f"  {fqn} expert {e}: {note}" for fqn, e, note in flagged]
        if self.recomputed:
            parts += ["", "Inside activation-checkpointed regions (quantized again when the backward recomputes them):"]
            parts += [f"  {fqn}" for fqn in self.recomputed]
        if self.partly_rewritten:
            parts += ["", "Rewritten in some compiled graphs only (where not, these GEMMs run unquantized):"]
            parts += [
                f"  {fqn}: {n} GEMM(s) not rewritten, see below" for fqn, n in sorted(self.partly_rewritten.items())
            ]
        if self.skipped:
            parts += ["", "Not rewritten:"]
            by_reason: dict[str, list[SkippedCandidate]] = defaultdict(list)
            for s in self.skipped:
                by_reason[s.reason].append(s)
            for reason, items in sorted(by_reason.items(), key=lambda kv: (kv[1][0].category != "expert", kv[0])):
                names = [f"{s.node}({s.weight_fqn})" if s.weight_fqn else s.node for s in items]
                shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
                parts.append(f"  [{len(items)}] {reason}:")
                parts.append(
                    textwrap.fill(shown, width=REPORT_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
                )
        return "\n".join(parts)

    def __repr__(self) -> str:
        return str(self)

    # -- graph views -----------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """The rewritten regions: parameter -> view ops -> weight quantizer -> GEMM <- input quantizer."""
        import networkx as nx

        g = nx.DiGraph()
        for r in self.rewritten:
            s = self.state[r.fqn]
            act = s.config.activation or "observe only"
            g.add_node(f"param:{r.fqn}", label=f"{r.fqn}\n{list(r.weight_shape)}", kind="parameter")
            wq = f"wq:{r.fqn}"
            g.add_node(
                wq, label=f"weight fake quant\n{s.config.weight}, per expert [{r.num_experts}]", kind="quantizer"
            )
            g.add_edge(f"param:{r.fqn}", wq)
            prev = wq
            for i, op in enumerate(r.path):
                n = f"view{i}:{r.fqn}"
                g.add_node(n, label=op, kind="view")
                g.add_edge(prev, n)
                prev = n
            gemm = f"gemm:{r.fqn}"
            g.add_node(gemm, label=f"{r.node}\n{r.form}", kind="gemm")
            g.add_edge(prev, gemm)
            x = f"x:{r.fqn}"
            g.add_node(x, label=r.input_node, kind="input")
            xq = f"xq:{r.fqn}"
            g.add_node(xq, label=f"input observer / fake quant\n{act}, {s.config.act_scale}", kind="quantizer")
            g.add_edge(x, xq)
            g.add_edge(xq, gemm)
            if r.offs_node is not None:
                offs = f"offs:{r.fqn}"
                g.add_node(offs, label=f"{r.offs_node} (offs)", kind="input")
                g.add_edge(offs, xq)
                g.add_edge(offs, gemm)
        return g

    def to_dot(self) -> str:
        """Graphviz DOT source of :meth:`to_networkx`."""
        g = self.to_networkx()
        ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
        lines = ["digraph moeq {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
        for n, data in g.nodes(data=True):
            label = data["label"].replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'  {ids[n]} [label="{label}", fillcolor="{_COLORS[data["kind"]]}"];')
        lines += [f"  {ids[a]} -> {ids[b]};" for a, b in g.edges]
        lines.append("}")
        return "\n".join(lines)

    def to_svg(self, path: str | Path | None = None) -> str:
        """Render to SVG (Graphviz ``dot`` when installed, else a built-in layered layout); write to
        ``path`` if given and return the SVG text."""
        dot = shutil.which("dot")
        if dot is not None:
            svg = subprocess.run([dot, "-Tsvg"], input=self.to_dot(), capture_output=True, text=True, check=True).stdout
        else:
            svg = _layered_svg(self.to_networkx())
        if path is not None:
            Path(path).write_text(svg)
        return svg


def _layered_svg(g: nx.DiGraph) -> str:
    """A dependency-free SVG: nodes in columns by longest-path depth, edges as straight arrows."""
    import networkx as nx

    depth: dict[Any, int] = {}
    for n in nx.topological_sort(g):
        depth[n] = max((depth[p] + 1 for p in g.predecessors(n)), default=0)
    rows: dict[int, int] = defaultdict(int)
    pos = {}
    w, h, gap_x, gap_y = 250, 44, 40, 16
    for n in g.nodes:
        col = depth[n]
        pos[n] = (10 + col * (w + gap_x), 10 + rows[col] * (h + gap_y))
        rows[col] += 1
    width = 20 + (max(depth.values(), default=0) + 1) * (w + gap_x)
    height = 20 + max(rows.values(), default=1) * (h + gap_y)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica" font-size="11">',
        '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z"/></marker></defs>',
    ]
    for a, b in g.edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        out.append(
            f'<line x1="{x0 + w}" y1="{y0 + h / 2}" x2="{x1}" y2="{y1 + h / 2}" stroke="#555" marker-end="url(#a)"/>'
        )
    for n, data in g.nodes(data=True):
        x, y = pos[n]
        out.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{_COLORS[data["kind"]]}" stroke="#333"/>'
        )
        for i, text in enumerate(data["label"].split("\n")[:2]):
            text = text if len(text) <= 40 else "..." + text[-37:]  # keep the informative tail of an FQN
            out.append(f'<text x="{x + 6}" y="{y + 17 + 14 * i}">{html.escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)
