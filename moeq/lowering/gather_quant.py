"""Post-grad pass: a shared-scale NVFP4 activation fake-quant moved before the routing gather.

transformers' grouped experts gather each routed (token, slot) row before the gate/up GEMM, and moeq fake-quantizes
the gathered rows::

    x_sorted = hidden[perm // top_k]                                   # [T * top_k, H]
    x_hat = moeq.fake_quant_act(x_sorted, offs, amax, "nvfp4", 0, -1)  # amax [1]: act_scale="shared", the default

NVFP4 under one global amax is row-local: each 16-block's scale comes from its own values. So
``fake_quant_act(hidden)[perm // top_k]`` is the same tensor, bit for bit, and quantizes ``top_k`` times fewer rows
(Qwen3-30B-A3B at 34816 routed rows: 4352 tokens, a pass over 17.8 MB instead of 142.6 MB). Rows past ``offs[-1]``
(routed to no expert) the op leaves unquantized, the moved one does not; only GEMMs read ``x_hat`` here, and no GEMM
reads those rows.

Applied under policy "auto" where ``moeq::grouped_qmm`` would run the activations' own pass anyway: a static row
count above ``QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT`` mean rows per expert (below it the op quantizes x in its load path,
one kernel per expert GEMM). A dynamic row count (Dynamo marks the token count dynamic from the second batch shape
it sees, so this is the usual case) is moved too: the graph serves every batch size, and the move saves ``top_k - 1``
of every ``top_k`` rows' quantization at large batches while costing one small kernel at decode sizes. The GEMM then
takes the gathered, already quantized rows as they are (``x_fmt`` None).
Training graphs keep it where it is: their forward saves ``x_hat`` for the weight gradient, a user this pass leaves
alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import fx

from moeq.lowering.inductor import fusion_policy, gemm_targets, node_value, with_node_value

__all__ = ["describe_quantize_before_gather", "enabled", "quantize_before_gather"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: mean routed rows per expert above which the op fake-quantizes NVFP4 activations in their own pass (kept equal to
#: ``moeq.runtime.kernels.grouped_qmm.QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT``, which a test checks; the lowering does not
#: import the runtime)
OWN_PASS_ROWS_PER_EXPERT = 16
#: the pass's switch (A/B runs, ``benchmarks/bench_e2e_modelopt.py --ab-gather``); part of the post-grad pass's uuid
ENABLED = True


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Graphs compiled and run by the ``moeq`` backend within the block move (or keep) the quantization before the
    gather (:data:`ENABLED`; an A/B switch). Compiled graphs guard on it, so run the graphs inside the block too: a
    call outside recompiles under the switch then in force."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(flag)
    try:
        yield
    finally:
        ENABLED = previous


def _row_gather(node: object) -> tuple[fx.Node, fx.Node] | None:
    """``(source, index)`` if ``node`` is ``source[index]`` over the rows of a 2-D ``source`` (one 1-D index)."""
    if not isinstance(node, fx.Node) or node.target is not aten.index.Tensor:
        return None
    source, indices = node.args
    if len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return None
    source_val, index_val = node_value(source), node_value(indices[0])
    if source_val is None or index_val is None or source_val.dim() != 2 or index_val.dim() != 1:
        return None
    if index_val.dtype not in (torch.int32, torch.int64):
        return None
    return source, indices[0]


def _movable(quant: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(source, index)`` if ``quant``, a ``moeq::fake_quant_act``, may be moved before the gather it reads."""
    x, offs, amax, fmt, _, contraction_dim = quant.args
    gather = _row_gather(x)
    if gather is None or fmt != "nvfp4" or contraction_dim % 2 != 1 or len(x.users) != 1:
        return None
    amax_val, offs_val, rows = node_value(amax), node_value(offs), node_value(x).shape[0]
    if amax_val is None or amax_val.numel() != 1 or offs_val is None:
        return None
    if isinstance(rows, int) and rows <= OWN_PASS_ROWS_PER_EXPERT * max(1, offs_val.numel()):
        return None
    targets = gemm_targets()
    if not all(user.op == "call_function" and user.target in targets for user in quant.users):
        return None
    return gather


def describe_quantize_before_gather(mode: str, x_fmt: str | None, shared_amax: bool) -> str:
    """What this pass does to a config's expert GEMMs under the current policy, for ``moeq.explain`` ("" where it
    does nothing: the conditions of :func:`_movable` that a config decides)."""
    if mode != "qat" or x_fmt != "nvfp4" or not shared_amax or fusion_policy() != "auto":
        return ""
    return (
        f"above {OWN_PASS_ROWS_PER_EXPERT} rows per expert or with a dynamic batch size, the NVFP4 fake quant of an "
        "input gathered from the tokens (transformers' grouped experts) runs per token before the routing gather: the "
        "same bits on top_k times fewer rows"
    )


def quantize_before_gather(graph: fx.Graph) -> int:
    """Move every movable shared-scale NVFP4 activation fake-quant of ``graph`` before its routing gather; returns the
    count."""
    if fusion_policy() != "auto" or not ENABLED:
        return 0
    moved = 0
    for quant in [n for n in graph.nodes if n.target == torch.ops.moeq.fake_quant_act.default]:
        found = _movable(quant)
        if found is None:
            continue
        source, index = found
        gather, _, amax, fmt, _, contraction_dim = quant.args
        source_val = node_value(source)
        with graph.inserting_before(gather):
            with source_val.fake_mode:
                offs_val = torch.full([1], source_val.shape[0], dtype=torch.int32, device=source_val.device)
            tokens = source_val.shape[0]
            if not isinstance(tokens, int):  # a dynamic batch: the graph reads the size, not a Python SymInt
                tokens = with_node_value(graph.call_function(aten.sym_size.int, (source, 0)), source_val.shape[0])
            offs = graph.call_function(
                aten.full.default,
                ([1], tokens),
                {"dtype": torch.int32, "device": source_val.device, "pin_memory": False},
            )
            with_node_value(offs, offs_val)
            whole = graph.call_function(
                torch.ops.moeq.fake_quant_act.default, (source, offs, amax, fmt, 0, contraction_dim)
            )
            with_node_value(whole, source_val.new_empty(source_val.shape))
            gathered = with_node_value(graph.call_function(aten.index.Tensor, (whole, [index])), node_value(quant))
        quant.replace_all_uses_with(gathered)
        graph.erase_node(quant)
        graph.erase_node(gather)
        moved += 1
        logger.info(
            "moeq: NVFP4 activation fake-quant of %s moved before its routing gather (%s rows instead of %s)",
            source.name, source_val.shape[0], node_value(gathered).shape[0],
        )  # fmt: skip
    if moved:
        graph.lint()
    return moved
