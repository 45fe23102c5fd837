"""Joint-graph pass: a QAT training graph saves its FP8 expert weights for backward as e4m3 codes.

AOTAutograd traces forward and backward together; a QAT FP8 expert weight then feeds two grouped GEMMs::

    wq = moeq.fake_quant_weight(w, amax, "fp8", 0, k)    # the weight's size in bf16
    y  = aten._grouped_mm(xq, permute(wq), offs)          # forward
    dx = aten._grouped_mm(dy, permute'(wq), offs)         # backward (dgrad), reading the saved wq

so the partitioner saves ``wq`` (a second copy of every expert weight) and the post-grad pass cannot fuse the
forward GEMM (its weight has another user). :class:`SaveWeightCodesPass` rewrites the chain to::

    data, scale, block = moeq.quantize_weight(w, amax, "fp8", 0, k)     # e4m3 codes, K-last (freeze's form)
    wq = moeq.dequant_weight(data, scale, block, "fp8", k, dtype)        # tagged: recompute in backward

``dequant_weight(quantize_weight(w))`` is ``fake_quant_weight(w)`` bit for bit, and the STE gradient of the
weight (``grad * (|w| <= amax)``) was traced from ``w`` and ``amax``, so the step computes the same values. The
partitioner now saves the codes (half the bytes) and recomputes the dequant in backward, where it has one user;
the post-grad pass (:mod:`moeq.lowering.inductor`) fuses each GEMM with its dequant into ``moeq::grouped_qmm``
(forward: FP8 x FP8 MMAs on the codes; dgrad: the bf16 gradient times the codes of the transposed weight).

Only FP8 weights: their scale is per expert, so the codes serve either orientation of the GEMM. NVFP4 blocks run
along K, so the dgrad (which contracts over N) cannot read them; QAT NVFP4 training graphs stay unfused.

The weight's STE gradient itself, for every format, is traced as a pointwise product of the weight-gradient GEMM's
output with a mask of the weight::

    gw = aten._grouped_mm(x^T, dy, offs)                       # wgrad
    dw = permute(gw) * (abs(w) <= amax.reshape(E, 1, 1))       # 6 bytes per bf16 element: gw, w read, dw written

:func:`fuse_weight_ste_masks` replaces the pair with ``moeq::grouped_wgrad_ste``, the same GEMM with the mask
applied in place on its output, reading the weight alone and writing only the clipped elements (2 bytes per
element; the same values bit for bit). Where the graph already has the weight's FP8 codes (QAT FP8), the mask
reads them instead (1 byte per element, the weight only where a code of +-448 or NaN cannot decide).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

from moeq.lowering import inductor
from moeq.lowering.inductor import fusion_enabled, gemm_targets
from moeq.lowering.permutation import gather_through_permutations

__all__ = [
    "TrainingGraphPass",
    "describe_training",
    "fuse_weight_ste_masks",
    "read_dequantized_copies",
    "recompute_reused_codes",
    "save_weight_codes",
]

logger = logging.getLogger(__name__)

_VIEWS = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def _gemm_users(node: fx.Node, gemms: set[Any]) -> list[fx.Node] | None:
    """The grouped GEMMs that take ``node`` (through permute / transpose views) as their weight, or None if
    anything else uses it."""
    found = []
    for user in node.users:
        if user.target in _VIEWS:
            below = _gemm_users(user, gemms)
            if below is None:
                return None
            found += below
        elif user.target in gemms and len(user.args) >= 2 and user.args[1] is node and user.args[0] is not node:
            found.append(user)
        else:
            return None
    return found


def save_weight_codes(graph: fx.Graph) -> int:
    """Rewrite every QAT FP8 weight chain of a joint graph that feeds more than one grouped GEMM (forward and
    dgrad) to save e4m3 codes; returns the count."""
    gemms = gemm_targets()
    rewritten = 0
    for node in [n for n in graph.nodes if n.target == torch.ops.moeq.fake_quant_weight.default]:
        w, amax, fmt, expert_dim, k_dim = node.args
        val = node.meta.get("val")
        if fmt != "fp8" or expert_dim % 3 != 0 or val is None or val.dim() != 3:
            continue
        users = _gemm_users(node, gemms)
        if users is None or len(users) < 2:
            continue
        with graph.inserting_before(node):
            stored = graph.call_function(torch.ops.moeq.quantize_weight.default, (w, amax, fmt, expert_dim, k_dim))
            stored.meta["val"] = torch.ops.moeq.quantize_weight.default(val, amax.meta["val"], fmt, expert_dim, k_dim)
            parts = []
            for i in range(3):
                part = graph.call_function(operator.getitem, (stored, i))
                part.meta["val"] = stored.meta["val"][i]
                parts.append(part)
            dequant = graph.call_function(torch.ops.moeq.dequant_weight.default, (*parts, fmt, k_dim % 3, val.dtype))
        dequant.meta.update({k: v for k, v in node.meta.items() if k != "eager_input_vals"})  # not its op's args
        dequant.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.replace_all_uses_with(dequant)
        graph.erase_node(node)
        rewritten += 1
        logger.info(
            "moeq: training graph saves an expert weight %s as FP8 codes for backward (%d GEMMs)",
            list(val.shape),
            len(users),
        )
    if rewritten:
        graph.lint()
    return rewritten


def _permute_chain(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """``(source, perm)`` with ``node == source.permute(perm)`` through single-user permute / transpose views."""
    perm: list[int] | None = None
    while node.target in _VIEWS:
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            return None
        rank = _val_dim(source)
        if node.target == torch.ops.aten.permute.default:
            step = [d % rank for d in node.args[1]]
        else:
            step = list(range(rank))
            a, b = (d % rank for d in node.args[1:3])
            step[a], step[b] = step[b], step[a]
        perm = step if perm is None else [step[p] for p in perm]
        node = source
    return node, perm if perm is not None else list(range(_val_dim(node)))


def _val_dim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _weight_mask(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``(w, amax)`` if ``node`` is ``abs(w) <= amax`` with a 3-D ``w`` and one amax per expert ``[E, 1, 1]``."""
    if not isinstance(node, fx.Node) or node.target != torch.ops.aten.le.Tensor:
        return None
    absolute, amax = node.args
    if not isinstance(absolute, fx.Node) or absolute.target != torch.ops.aten.abs.default:
        return None
    w = absolute.args[0]
    w_val, amax_val = w.meta.get("val"), amax.meta.get("val") if isinstance(amax, fx.Node) else None
    if not isinstance(w_val, torch.Tensor) or not isinstance(amax_val, torch.Tensor) or w_val.dim() != 3:
        return None
    if tuple(amax_val.shape) != (w_val.shape[0], 1, 1) or amax_val.dtype != torch.float32:
        return None
    return w, amax


_AMAX_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _view_source(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.target in _AMAX_VIEWS:
        node = node.args[0]
    return node


_CODES_OF_WEIGHT = (torch.ops.moeq.quantize_weight.default, torch.ops.moeq.fake_quant_weight_from_codes.default)


def _fp8_codes(graph: fx.Graph, w: fx.Node, amax: fx.Node, before: fx.Node) -> fx.Node | None:
    """``w``'s FP8 codes with this ``amax`` in ``w``'s layout, from a ``quantize_weight`` the graph already runs
    (:func:`save_weight_codes`) or the codes a ``fake_quant_weight_from_codes`` reads, or None."""
    for user in w.users:
        if user.target not in _CODES_OF_WEIGHT or user.args[0] is not w:
            continue
        if _view_source(user.args[1]) is not _view_source(amax):
            continue
        if user.target == torch.ops.moeq.fake_quant_weight_from_codes.default and user.args[5] == "fp8":
            data, k_dim = user.args[2], user.args[7]
        elif user.target == torch.ops.moeq.quantize_weight.default and user.args[2] == "fp8":
            k_dim = user.args[4]
            data = next((u for u in user.users if u.target == operator.getitem and u.args[1] == 0), None)
            if data is None:
                with graph.inserting_before(before):
                    data = graph.call_function(operator.getitem, (user, 0))
                data.meta["val"] = user.meta["val"][0]
        else:
            continue
        if k_dim % 3 == 2:  # stored K-last: w's own layout
            return data
        with graph.inserting_before(before):
            codes = graph.call_function(torch.ops.aten.permute.default, (data, [0, 2, 1]))
        codes.meta["val"] = data.meta["val"].permute(0, 2, 1)
        return codes
    return None


def _backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes of a joint graph that depend on a tangent (the backward's)."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        tangent = node.op == "placeholder" and node.name.startswith("tangents")
        if tangent or any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return backward


def read_dequantized_copies(graph: fx.Graph) -> int:
    """Hand a ``fake_quant_weight_from_codes``'s ``dequantized`` copy (``moeq.reuse_weight_codes(dequantized=True)``:
    its value, computed once per block) to what would otherwise dequantize the codes at every micro-batch. An FP8
    weight whose forward is a grouped GEMM (fused on the codes) gives the copy to its backward GEMMs (the dgrad);
    any other weight (NVFP4, a module list's expert) is read from the copy everywhere. Returns the number of reads
    rewired."""
    backward = _backward_nodes(graph)
    gemms = [n for n in graph.nodes if n.target in gemm_targets() and len(n.args) >= 2]
    rewired = 0
    for node in [n for n in graph.nodes if n.target == torch.ops.moeq.fake_quant_weight_from_codes.default]:
        copy = node.args[8] if len(node.args) > 8 else node.kwargs.get("dequantized")
        if copy is None:
            continue
        reads = [(g, *inductor.trace_views(g.args[1])) for g in gemms]
        reads = [(g, perm, views) for g, root, perm, views in reads if root is node]
        if node.args[5] != "fp8" or all(g in backward for g, _, _ in reads):
            rewired += len(node.users)
            node.replace_all_uses_with(copy)
            graph.erase_node(node)
            continue
        for gemm, perm, views in reads:
            if gemm in backward:
                with graph.inserting_before(gemm):
                    weight = inductor.permute_node(graph, copy, perm)
                gemm.replace_input_with(gemm.args[1], weight)
                _erase_unused(graph, views[:1])
                rewired += 1
    if rewired:
        logger.info("moeq: training graph reads %d expert weights from dequantized copies", rewired)
        graph.lint()
    return rewired


def recompute_reused_codes(graph: fx.Graph) -> int:
    """Mark every FP8 ``fake_quant_weight_from_codes`` of a joint graph (inside ``moeq.reuse_weight_codes``) to be
    recomputed in backward: the partitioner then saves nothing for the weight (the codes are graph inputs), and the
    forward and dgrad GEMMs each fuse with their own read of the codes. An NVFP4 one stays saved: its dequant is a
    pass of its own (0.56 bytes read and 2 written per element), which recomputing would run twice per step, and
    its bf16 output is what a block-free graph saves too. Returns the count."""
    marked = 0
    for node in graph.nodes:
        if node.target == torch.ops.moeq.fake_quant_weight_from_codes.default and node.args[5] == "fp8":
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            marked += 1
    if marked:
        logger.info("moeq: training graph reads %d FP8 expert weights from reused codes", marked)
    return marked


def fuse_weight_ste_masks(graph: fx.Graph) -> int:
    """Replace each ``permute(_grouped_mm(a, b, offs)) * (abs(w) <= amax)`` (a weight's STE gradient) with
    ``permute(moeq::grouped_wgrad_ste(a, b, offs, w, amax, perm, codes))``, ``codes`` the weight's FP8 codes where
    the graph computes them (else None); returns the count."""
    fused = 0
    for mul in [n for n in graph.nodes if n.target == torch.ops.aten.mul.Tensor]:
        for grad, mask in (mul.args, mul.args[::-1]):
            found = _weight_mask(mask)
            alone = isinstance(grad, fx.Node) and len(grad.users) == 1  # else the GEMM would run twice
            chain = _permute_chain(grad) if alone and found is not None else None
            if chain is None:
                continue
            gemm, perm = chain
            if gemm.target != torch.ops.aten._grouped_mm.default or len(gemm.args) != 3 or gemm.kwargs:
                continue
            mul_val, gemm_val = mul.meta.get("val"), gemm.meta.get("val")
            w, amax = found
            if mul_val is None or gemm_val is None or perm[0] != 0 or mul_val.dtype != gemm_val.dtype:
                continue
            if tuple(mul_val.shape) != tuple(w.meta["val"].shape):
                continue
            codes = _fp8_codes(graph, w, amax, mul)
            with graph.inserting_before(mul):
                wgrad = graph.call_function(
                    torch.ops.moeq.grouped_wgrad_ste.default, (*gemm.args, w, amax, perm, codes)
                )
                wgrad.meta["val"] = gemm_val
                view = wgrad
                if perm != sorted(perm):
                    view = graph.call_function(torch.ops.aten.permute.default, (wgrad, perm))
                    view.meta["val"] = gemm_val.permute(perm)
            mul.replace_all_uses_with(view)
            graph.erase_node(mul)
            _erase_unused(graph, [grad, mask, *mask.all_input_nodes])
            fused += 1
            logger.info(
                "moeq: training graph applies the STE mask of expert weight %s in its wgrad%s",
                list(mul_val.shape),
                " (deciding from its FP8 codes)" if codes is not None else "",
            )
            break
    if fused:
        graph.lint()
    return fused


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the call_function ``nodes`` left without users, and the single-input ops above them that then are."""
    for node in nodes:
        while node.op == "call_function" and not node.users and not getattr(node, "_erased", False):
            inputs = node.all_input_nodes
            graph.erase_node(node)
            if len(inputs) != 1:
                break
            node = inputs[0]


def describe_training(mode: str, w_fmt: str, channels: bool = False) -> str:
    """What a training graph compiled by the ``moeq`` backend does with its expert GEMMs under the current
    fusion policy (for ``moeq.explain``); ``channels``: FP8 channel-wise weight scales."""
    if not fusion_enabled():
        return "a training graph saves the quantized weight for backward and keeps the Q/DQ ops"
    ste = "each weight's STE mask is applied inside its wgrad GEMM (moeq::grouped_wgrad_ste)"
    gathers = ""
    if inductor.combine_fusion_enabled():
        gathers = (
            "; the backward's scatter-adds through the MoE's sort permutation run as gathers; from top-"
            f"{inductor.COMBINE_MIN_TOP_K} and {inductor.COMBINE_MIN_ROWS} routed rows up, the top-k gather's "
            "gradient runs as moeq::combine_experts (reading the activation's STE mask in the same pass) and the "
            "combine's two gradients as one moeq::combine_experts_backward"
        )
    reuse = "; inside moeq.reuse_weight_codes the codes are computed once for all the block's micro-batches"
    if mode == "qat" and w_fmt == "fp8" and channels:
        return (
            "a training graph quantizes each expert weight to FP8 codes with channel-wise scales once per step and "
            "saves them for backward (not a bf16 copy); the forward runs moeq::grouped_qmm on the codes, the dgrad "
            "(which contracts over the channels) their dequant with torch._grouped_mm, and autograd applies the STE "
            f"mask{gathers}{reuse}"
        )
    if mode == "qat" and w_fmt == "fp8":
        return (
            "a training graph quantizes each expert weight to FP8 codes once per step and saves them for backward "
            f"(not a bf16 copy); forward and dgrad run moeq::grouped_qmm on the codes; {ste}, which reads the codes"
            f"{gathers}; inside moeq.reuse_weight_codes the codes are computed once for all the block's micro-batches"
        )
    reuse = "; inside moeq.reuse_weight_codes each weight is the dequant of codes computed once per block" * (
        mode == "qat"
    )
    return f"a training graph saves the quantized weight for backward and keeps the Q/DQ ops; {ste}{gathers}{reuse}"


class TrainingGraphPass(CustomGraphPass):
    """The joint-graph pass object installed by the ``moeq`` backend (``joint_custom_post_pass``): FP8 weight
    codes saved for backward, STE weight masks applied inside the weight-gradient GEMMs, and (with the combine
    fusion on) the MoE's permutation scatter-adds as gathers (:mod:`moeq.lowering.permutation`)."""

    def __call__(self, graph: fx.Graph) -> None:
        save_weight_codes(graph)
        fuse_weight_ste_masks(graph)
        read_dequantized_copies(graph)
        recompute_reused_codes(graph)
        if inductor.combine_fusion_enabled():
            gather_through_permutations(graph)

    def uuid(self) -> Any:
        return inductor.compile_fingerprint()
