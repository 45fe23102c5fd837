"""Inductor post-grad pass: ``act Q/DQ -> grouped GEMM <- weight Q/DQ`` becomes one ``moeq::grouped_qmm``.

The expert pass (:mod:`moeq.passes.insert_qdq`) leaves, after AOTAutograd, chains like::

    xq = moeq.fake_quant_act(x, offs, input_amax, fmt, 0, -1)          # optional (W8A16 / W4A16)
    wq = moeq.fake_quant_weight(w, weight_amax, fmt, 0, k_dim)          # or moeq.dequant_weight(...) (deploy)
    y  = aten._grouped_mm(xq, permute(wq, ...), offs)                   # or transformers.grouped_mm_fallback
    y  = aten.bmm(xq, permute(wq, ...))                                 # batched experts: xq [E, M, K]

:class:`GroupedQmmPass` replaces each GEMM by ``moeq::grouped_qmm`` on the raw operands (the same view
applied to the raw weight), so the GEMM runs as one Triton kernel that quantizes in its load path (large FP8 x
FP8 batches: after one codes pass per operand, see :func:`moeq.runtime.kernels.grouped_qmm.quantizes_once`). A
``bmm`` over experts becomes the same op on its ``[E * M, K]`` rows with offsets ``M, 2M, ..., E * M``, viewed back
as ``[E, M, N]``.
A chain whose quantized weight has other users (a training graph saves it for backward) is left
unfused: fusing would quantize the weight twice. (QAT FP8 training graphs avoid that: the joint-graph pass of
:mod:`moeq.lowering.joint` saves the weight's codes and gives each GEMM its own recomputed dequant, which fuses
here, also when the GEMM contracts over the weight's N, as the dgrad does.) A quantized activation with other users is passed to
the kernel as it is (no in-kernel activation quantization), unless both operands are FP8: then the kernel
quantizes the raw activation again for FP8 MMAs. Which chains fuse is a policy (:func:`fusion`):
``"auto"`` (default) fuses a chain only where ``moeq::grouped_qmm`` measured faster than the unfused path
(BENCHMARKS.md). The in-load kernel re-quantizes each operand tile once per output tile it feeds, CUDA-core
work that grows with the rows per expert, so QAT NVFP4 chains fuse up to :data:`FUSE_MAX_ROWS_PER_EXPERT`
mean routed rows per expert (decode-size batches), except bf16 QAT NVFP4 x NVFP4 on CUDA, which always fuses:
above that bound the op fake-quantizes the activations once and multiplies with the Gluon kernel on sm_90 (the
weight fake-quantized in shared memory), elsewhere with the unfused path's kernels
(:func:`moeq.runtime.kernels.grouped_qmm.quantizes_nvfp4_once`). FP8 x FP8 chains (QAT FP8, deploy W8A8) always
fuse: above a few rows per expert the op quantizes the activations once in their own pass and multiplies codes,
and above a few dozen a QAT weight too (:func:`moeq.runtime.kernels.grouped_qmm.quantizes_once`,
``quantizes_weight_once``).
Deploy chains always fuse: their unfused path (``moeq::dequant_weight``'s Triton kernel, then ``torch._grouped_mm``)
was slower up to a few hundred rows per expert (W4A16 / W8A16: 1.04-1.11x at 272, 3.1-3.6x at 32; BENCHMARKS.md,
session 13), and above those (W4A16 / W8A16 past 384 / 256 rows per expert, session 24) the op itself runs that
unfused pair (:func:`moeq.runtime.kernels.grouped_qmm.dequantizes_weight_first`). ``"always"`` fuses every chain
(one kernel per expert GEMM at every size), ``"never"`` none. It is a
:class:`~torch._inductor.custom_graph_pass.CustomGraphPass` with a ``uuid()`` (which includes the policy)
so the FX graph cache keeps working, and :func:`with_grouped_qmm_pass` composes it with whatever pass is already
installed in ``post_grad_custom_post_pass`` (torch 2.11 holds one object there; 2.13 also a list).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "COMBINE_MIN_ROWS",
    "COMBINE_MIN_TOP_K",
    "FUSE_MAX_ROWS_PER_EXPERT",
    "GroupedQmmPass",
    "combine_fusion",
    "combine_fusion_enabled",
    "combine_pays",
    "compile_fingerprint",
    "compiled_size",
    "describe_combine",
    "describe_lowering",
    "fuse_combine_backward",
    "fuse_expert_combine",
    "fuse_grouped_qmm",
    "fusion",
    "fusion_policy",
    "unfused",
    "with_grouped_qmm_pass",
    "with_pass",
]

logger = logging.getLogger(__name__)

POLICIES = ("auto", "always", "never")

#: ``"auto"``: the largest mean routed rows per expert at which a QAT chain without FP8 activations (QAT NVFP4,
#: FP8 weights with 16-bit activations) fuses; deploy and FP8 x FP8 chains fuse at every size. From the H100
#: crossover of ``benchmarks/bench_grouped_qmm.py`` (Qwen3-30B-A3B shapes): the in-load QAT kernel wins at 0.5
#: rows per expert and loses from 32.
FUSE_MAX_ROWS_PER_EXPERT = {"qat": 16}

#: the smallest top-k whose combine :func:`fuse_expert_combine` takes from Inductor. H200, 4352 tokens of H 2048
#: (``benchmarks/bench_combine.py``, CUDA-graph replays, BENCHMARKS.md session 25): at top-8 Inductor's fused
#: gather-reduction reads 0.8 TB/s and moeq's 3.8-4.2 TB/s (4.7x-5.3x, 0.201 -> 0.042 ms); at top-4 and top-2
#: Inductor's is already at 3.7-3.9 TB/s and moeq's ties it (0.98x), so those stay Inductor's. 5-7 not measured.
COMBINE_MIN_TOP_K = 8
#: ... and the smallest routed row count (tokens x top-k) when Inductor compiles (a symbolic count: the size the
#: graph is compiled for, its hint, as Inductor's own size-dependent choices read it): the op launches from Python
#: (tens of microseconds of host time, like the other moeq ops), which a small batch does not earn back. At 512 rows
#: (64 tokens) the kernel saved 1.7 us, at 34816 rows 160 us (session 25); between them not measured.
COMBINE_MIN_ROWS = 32768

_POLICY = "auto"
_COMBINE = True


@contextlib.contextmanager
def fusion(policy: str) -> Iterator[None]:
    """Graphs compiled by the ``moeq`` backend within the block use fusion ``policy``: ``"auto"``,
    ``"always"`` (one fused kernel per expert GEMM) or ``"never"`` (unfused Q/DQ + GEMM). Compiled graphs guard on
    the policy (:func:`check_compile_switches`), so a call outside the block runs (or compiles) the graph of the
    policy in force there."""
    global _POLICY
    if policy not in POLICIES:
        raise ValueError(f"unknown fusion policy {policy!r}; choose one of {', '.join(POLICIES)}")
    previous, _POLICY = _POLICY, policy
    try:
        yield
    finally:
        _POLICY = previous


@contextlib.contextmanager
def combine_fusion(enabled: bool) -> Iterator[None]:
    """Whether graphs compiled by the ``moeq`` backend within the block run transformers' grouped-experts combine
    as ``moeq::combine_experts`` where it pays (top-k of at least :data:`COMBINE_MIN_TOP_K`, at least
    :data:`COMBINE_MIN_ROWS` routed rows; default on, under every fusion policy but ``"never"``). The same switch
    covers training graphs' backward of it: the scatter-adds through the MoE's sort permutation run as gathers
    (:mod:`moeq.lowering.permutation`). Compiled graphs guard on the switch, as on the fusion policy."""
    global _COMBINE
    previous, _COMBINE = _COMBINE, bool(enabled)
    try:
        yield
    finally:
        _COMBINE = previous


def unfused() -> contextlib.AbstractContextManager[None]:
    """Graphs compiled by the ``moeq`` backend within the block keep the unfused Q/DQ + GEMM."""
    return fusion("never")


def fusion_policy() -> str:
    """The policy in force (:func:`fusion`): ``"auto"``, ``"always"`` or ``"never"``."""
    return _POLICY


def check_compile_switches() -> None:
    """Read the switches a graph is lowered under: the fusion policy, the combine fusion and
    :data:`moeq.lowering.gather_quant.ENABLED`. A prepared model's forward pre-hook calls this while Dynamo traces
    it, so Dynamo guards on their values. Without that, another instance of a module class compiled under other
    switches (an A/B of two policies in one process) would be served the first instance's graph: Dynamo reuses a
    frame's graph for any instance whose guards pass, and the switches are read only when Inductor lowers."""
    from moeq.lowering import gather_quant

    if _POLICY not in POLICIES or _COMBINE not in (False, True) or gather_quant.ENABLED not in (False, True):
        raise ValueError(
            f"invalid moeq lowering switches: policy {_POLICY!r}, combine {_COMBINE!r}, "
            f"gather_quant {gather_quant.ENABLED!r}"
        )


def fusion_enabled() -> bool:
    """Whether the lowering may fuse at all (any policy but ``"never"``)."""
    return _POLICY != "never"


def _pays(mode: str, w_fmt: str, x_fmt: str | None, rows: Any, num_experts: int, bf16_cuda: bool = True) -> bool:
    """Whether policy ``auto`` fuses a chain over ``rows`` routed rows (symbolic rows: deploy, FP8 x FP8 and, with
    bf16 activations on CUDA, QAT NVFP4 x NVFP4)."""
    if mode == "deploy" or (w_fmt == "fp8" and x_fmt == "fp8"):
        # deploy: the unfused path (dequant kernel + torch._grouped_mm) measured slower at every size (1.04-1.11x
        # at 34k rows, 3.1-3.6x at 4k); FP8 x FP8 quantizes once at large sizes (quantizes_once)
        return True
    if bf16_cuda and mode == "qat" and w_fmt == "nvfp4" and x_fmt in ("nvfp4", None) and _gluon_qat_nvfp4():
        # above the in-load bound the op fake-quantizes x once (x_fmt None: x as given) and multiplies with the Gluon
        # kernel on sm_90 (1.37-1.58x the unfused path at 34k rows, session 36), elsewhere with the unfused path's own
        # kernels (quantizes_nvfp4_once)
        return True
    if not isinstance(rows, int):
        return False
    return rows <= FUSE_MAX_ROWS_PER_EXPERT[mode] * max(1, num_experts)


def _gluon_qat_nvfp4() -> bool:
    """Whether ``moeq::grouped_qmm`` runs large QAT NVFP4 GEMMs itself (``grouped_qmm.GLUON_QAT_NVFP4``)."""
    try:
        from moeq.runtime.kernels import grouped_qmm as grouped_qmm_kernels
    except ImportError:  # no triton: the reference ops
        return False
    return grouped_qmm_kernels.GLUON_QAT_NVFP4


def describe_lowering(mode: str, w_fmt: str, x_fmt: str | None) -> str:
    """What the ``moeq`` backend runs on CUDA for a ``torch._grouped_mm`` (or ``bmm``) expert chain of this mode and
    these formats under the current policy (derived from :func:`_pays`, ``quantizes_once`` and
    ``dequantizes_weight_first``, so it cannot drift)."""
    try:
        from moeq.runtime.kernels import grouped_qmm as grouped_qmm_kernels
        from moeq.runtime.kernels.grouped_qmm import (
            DEQUANT_FIRST_ROWS_PER_EXPERT,
            QUANTIZE_ONCE_ROWS_PER_EXPERT,
            WEIGHT_CODES_ROWS_PER_EXPERT,
            dequantizes_weight_first,
            quantizes_once,
            quantizes_weight_once,
        )
    except ImportError:
        return "the moeq ops' plain-torch reference (triton is not installed)"

    one = "one moeq::grouped_qmm Triton kernel per expert GEMM"
    unfused_path = "moeq's fake-quant kernels" if mode == "qat" else "moeq::dequant_weight's kernel"
    unfused_path += " + torch._grouped_mm"
    if _POLICY == "never":
        return unfused_path
    if _POLICY == "always":
        return f"{one} at every size"
    w_mode = f"fake_{w_fmt}" if mode == "qat" else w_fmt
    if quantizes_once(w_mode, x_fmt, 2**31, 1):
        small = f"{one} up to {QUANTIZE_ONCE_ROWS_PER_EXPERT} mean routed rows per expert"
        if quantizes_weight_once(w_mode, x_fmt, 2**31, 1):
            middle = f"up to {WEIGHT_CODES_ROWS_PER_EXPERT}, an activation codes pass and the GEMM (weight as loaded)"
            if grouped_qmm_kernels.WEIGHT_PASS_IN_GEMM:
                large = "one launch writing the weight's codes and multiplying them (weight_pass_gemm)"
                return f"{small}; {middle}; above, an activation codes pass and {large}"
            two = "an activation codes pass, a weight codes pass and the FP8 codes GEMM"
            if grouped_qmm_kernels.GLUON_QAT_FP8 and w_mode == "fake_fp8":
                bound = grouped_qmm_kernels.GLUON_ROWS_PER_EXPERT
                gluon = (
                    "an activation codes pass and the warp-specialized Gluon kernel (weight converted in shared memory)"
                )
                return f"{small}; {middle}; up to {bound} on sm_90, {gluon}; else {two}"
            return f"{small}; {middle}; above, {two}"
        return f"{small}; above, an activation codes pass and the FP8 codes GEMM"
    if dequantizes_weight_first(w_mode, x_fmt, 2**31, 1):
        bound = DEQUANT_FIRST_ROWS_PER_EXPERT[w_mode]
        return f"{one} up to {bound} mean routed rows per expert; above, {unfused_path}"
    if mode == "qat" and w_fmt == "nvfp4" and x_fmt in ("nvfp4", None) and _gluon_qat_nvfp4():
        bound = grouped_qmm_kernels.QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT
        gluon = (
            "the warp-specialized Gluon kernel (weight fake-quantized in shared memory to formats' values, a "
            "zero's sign aside, which no product sees; bf16 wgmma)"
        )
        act = "an activation fake-quant pass and, " if x_fmt == "nvfp4" else ""
        return (f"{one} up to {bound} mean routed rows per expert; above, {act}up to "
                f"{grouped_qmm_kernels.GLUON_ROWS_PER_EXPERT} on sm_90, {gluon}; else {unfused_path}")  # fmt: skip
    if _pays(mode, w_fmt, x_fmt, None, 1):
        return f"{one} at every size"
    bound = FUSE_MAX_ROWS_PER_EXPERT[mode]
    return f"{one} up to {bound} mean routed rows per expert; above, {unfused_path}"


def combine_fusion_enabled() -> bool:
    """Whether the MoE combine rewrites run (:func:`combine_fusion` on, fusion policy not ``"never"``)."""
    return _COMBINE and _POLICY != "never"


def combine_pays(rows: Any, top_k: int) -> bool:
    """Whether a top-``top_k`` combine over ``rows`` routed rows runs as ``moeq::combine_experts``: from
    :data:`COMBINE_MIN_TOP_K` and :data:`COMBINE_MIN_ROWS` up (a symbolic count judged by :func:`compiled_size`)."""
    size = compiled_size(rows)
    return top_k >= COMBINE_MIN_TOP_K and size is not None and size >= COMBINE_MIN_ROWS


def describe_combine() -> str:
    """What the ``moeq`` backend does with transformers' grouped-experts combine under the current settings."""
    if not combine_fusion_enabled():
        return "the MoE combine after the down projection is Inductor's"
    return (
        f"the MoE combine after the down projection (routing weights, un-permute, top-k sum) runs as "
        f"moeq::combine_experts from top-{COMBINE_MIN_TOP_K} and {COMBINE_MIN_ROWS} routed rows up (below, Inductor's "
        f"kernel is as fast; a dynamic batch is judged by the size it is compiled for)"
    )


def gemm_targets() -> set[Any]:
    targets: set[Any] = {torch.ops.aten._grouped_mm.default, torch.ops.aten.bmm.default}
    transformers_ops = getattr(torch.ops, "transformers", None)
    fallback = getattr(transformers_ops, "grouped_mm_fallback", None) if transformers_ops is not None else None
    if fallback is not None:
        targets.add(fallback.default)
    return targets


def trace_views(node: Any) -> tuple[Any, list[int], list[fx.Node]]:
    """Walk back through permute/transpose: (root, perm with ``node`` dim i = root dim perm[i], views)."""
    perm, views = [0, 1, 2], []
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target == torch.ops.aten.permute.default:
            dims = [d % 3 for d in node.args[1]]
        elif node.target == torch.ops.aten.transpose.int:
            d0, d1 = node.args[1] % 3, node.args[2] % 3
            dims = [0, 1, 2]
            dims[d0], dims[d1] = d1, d0
        else:
            break
        perm = [dims[p] for p in perm]
        views.append(node)
        node = node.args[0]
    return node, perm, views


def node_value(node: Any) -> Any:
    """The fake tensor (or SymInt) a node's ``meta["val"]`` holds; None for a non-node or a node without one."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _match(gemm: fx.Node) -> tuple[tuple[Any, ...], list[fx.Node]] | None:
    """The grouped_qmm arguments for ``gemm`` and the nodes it made redundant, or None if not a moeq chain.
    A ``bmm`` over experts (``[E, M, K] x [E, K, N]``) matches with ``offs`` None: its rows are E equal segments."""
    batched = gemm.target == torch.ops.aten.bmm.default
    if batched:
        if len(gemm.args) != 2 or gemm.kwargs:
            return None
        (a, b), offs = gemm.args, None
    elif len(gemm.args) != 3 or gemm.kwargs.get("bias") is not None or gemm.kwargs.get("out_dtype") is not None:
        return None
    else:
        a, b, offs = gemm.args
    root, perm, views = trace_views(b)
    if not isinstance(root, fx.Node) or root.op != "call_function":
        return None
    if root.target == torch.ops.moeq.fake_quant_weight.default:
        w, amax, w_fmt, expert_dim, k_dim = root.args
        mode = "qat"
    elif root.target == torch.ops.moeq.dequant_weight.default:
        w, amax, block, w_fmt, k_dim, _ = root.args
        expert_dim, mode = 0, "deploy"
    elif root.target == torch.ops.moeq.fake_quant_weight_from_codes.default and root.args[5] == "fp8":
        # FP8 codes times the per-expert scale: deploy's kernel computes exactly the QAT values from them. (NVFP4's
        # deploy kernel applies the global scale to the fp32 product, not to each bf16 weight: not the QAT values.)
        _, _, w, amax, block, w_fmt, expert_dim, k_dim = root.args[:8]
        mode = "deploy"
    else:
        return None
    amax_val = node_value(amax)
    channels = amax_val is not None and amax_val.dim() > 1  # FP8 channel-wise weight scales [E, N]
    if any(len(n.users) != 1 for n in [*views, root]):
        # the quantized weight is needed elsewhere too (e.g. saved for backward in a training graph): fusing
        # would quantize it twice, so the unfused path is cheaper
        return None
    w_val = node_value(w)
    if w_val is None or w_val.dim() != 3 or expert_dim % 3 != 0:
        return None
    k_dim = k_dim % 3
    if perm[0] != 0 or (perm[1] != k_dim and (w_fmt != "fp8" or channels)):
        # NVFP4 blocks run along the quantization's K, which must be the GEMM's K, and so must channel-wise scales
        # (one per output column); a per-expert FP8 scale lets the GEMM contract either dim (a training graph's
        # dgrad contracts over N)
        return None
    x, x_amax, x_fmt = a, None, None
    dead: list[fx.Node] = [*views, root]
    if isinstance(a, fx.Node) and a.target == torch.ops.moeq.fake_quant_act_dynamic.default:
        xa, offs_a, fmt_a, e_a, k_a = a.args
        # dynamic per-token FP8 (row amax, then the codes inside grouped_qmm), where x̂ has no other user: x̂'s own
        # row amax is not always x's (448 * s rounds), so re-quantizing a saved x̂ would not be exactly the same
        if len(a.users) == 1 and not batched and offs_a is offs and k_a % 2 == 1 and node_value(xa) is not None:
            x, x_fmt = xa, "fp8_token"
            dead.append(a)
    elif isinstance(a, fx.Node) and a.target == torch.ops.moeq.fake_quant_act.default:
        xa, offs_a, amax_a, fmt_a, e_a, k_a = a.args
        alone = len(a.users) == 1
        # x̂ with other users (a training graph saves it for wgrad) is computed anyway: the kernel takes it as
        # it is (x_fmt None), unless both operands are FP8: quantizing x again in the kernel buys FP8 MMAs
        requantize = alone or (fmt_a == "fp8" and w_fmt == "fp8")
        rank = 3 if batched else 2  # batched: [E, M, K] quantized with the expert dim 0, K last
        layout = (e_a % 3, k_a % 3) == (0, 2) if batched else k_a % 2 == 1
        if requantize and offs_a is offs and layout and node_value(xa) is not None and node_value(xa).dim() == rank:
            x, x_amax, x_fmt = xa, amax_a, fmt_a
            if alone:
                dead.append(a)
    if node_value(x) is None or (offs is not None and node_value(offs) is None):
        return None
    rows = node_value(x).shape[0] * node_value(x).shape[1] if batched else node_value(x).shape[0]
    x_fmt_paid = "fp8" if x_fmt == "fp8_token" else x_fmt
    bf16_cuda = node_value(x).is_cuda and node_value(x).dtype == torch.bfloat16
    if _POLICY == "auto" and not _pays(mode, w_fmt, x_fmt_paid, rows, w_val.shape[0], bf16_cuda):
        logger.info("moeq: %s %s GEMM over %s rows left unfused (faster there)", mode, w_fmt, rows)
        return None
    if mode == "qat":
        return ("qat", w, perm, amax, None, x, offs, x_amax, w_fmt, x_fmt), dead
    # stored data and block scales are K-last ([E, N, K/2], [E, N, K/16]): the kernel takes them as [E, K', N];
    # a GEMM contracting over the quantization's N (FP8 dgrad) takes the data as it is stored
    data_perm = [0, 2, 1] if perm[1] == k_dim else [0, 1, 2]
    return ("deploy", w, data_perm, amax, block if w_fmt == "nvfp4" else None, x, offs, x_amax, w_fmt, x_fmt), dead


def with_node_value(node: fx.Node, val: Any) -> fx.Node:
    """Give ``node`` (one the pass created) its ``meta["val"]``, which later passes and Inductor's lowering read;
    returns ``node``."""
    node.meta["val"] = val
    return node


def permute_node(graph: fx.Graph, node: fx.Node, perm: list[int]) -> fx.Node:
    """``node.permute(perm)`` as a new node with its value (``node`` itself for the identity)."""
    if perm == [0, 1, 2]:
        return node
    return with_node_value(
        graph.call_function(torch.ops.aten.permute.default, (node, perm)), node_value(node).permute(perm)
    )


def _batched_as_rows(graph: fx.Graph, x: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``bmm``'s ``[E, M, K]`` operand as grouped_qmm's ``[E * M, K]`` rows and offsets ``M, 2M, ..., E * M``."""
    aten = torch.ops.aten
    x_val = node_value(x)
    num_experts, m, k = x_val.shape
    if not x_val.is_contiguous():
        x = with_node_value(
            graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format}),
            x_val.contiguous(),
        )
    rows = with_node_value(graph.call_function(aten.view.default, (x, [-1, k])), x_val.reshape(-1, k))
    if not isinstance(m, int):
        m = with_node_value(graph.call_function(aten.sym_size.int, (x, 1)), m)
    with x_val.fake_mode:
        offs_val = torch.arange(1, num_experts + 1, dtype=torch.int32, device=x_val.device) * x_val.shape[1]
    iota = graph.call_function(
        torch.ops.prims.iota.default,
        (num_experts,),
        {"start": m, "step": m, "dtype": torch.int32, "device": x_val.device, "requires_grad": False},
    )
    return rows, with_node_value(iota, offs_val)


def fuse_grouped_qmm(graph: fx.Graph) -> int:
    """Replace every moeq Q/DQ + grouped GEMM chain of ``graph`` by ``moeq::grouped_qmm``; returns the count."""
    targets = gemm_targets()
    fused = 0
    for gemm in [n for n in graph.nodes if n.op == "call_function" and n.target in targets]:
        matched = _match(gemm)
        if matched is None:
            continue
        (mode, w, perm, scale, block, x, offs, x_amax, w_fmt, x_fmt), dead = matched
        batched = offs is None
        with graph.inserting_before(gemm):
            if batched:
                x, offs = _batched_as_rows(graph, x)
            w_view = permute_node(graph, w, perm)
            block_view = permute_node(graph, block, [0, 2, 1]) if block is not None else None
            # "always" promises one kernel per GEMM: quantization stays in the load path at every size
            quantize_once = None if _POLICY == "auto" else False
            args = (x, w_view, offs, scale, block_view, x_amax, mode, w_fmt, x_fmt, quantize_once)
            qmm = graph.call_function(torch.ops.moeq.grouped_qmm.default, args)
        x_val, gemm_val = node_value(x), node_value(gemm)
        out = with_node_value(qmm, x_val.new_empty((x_val.shape[0], gemm_val.shape[-1])))
        if batched:
            with graph.inserting_after(qmm):
                num_experts, _, n = gemm_val.shape
                out = graph.call_function(torch.ops.aten.view.default, (qmm, [num_experts, -1, n]))
            with_node_value(out, node_value(qmm).view(gemm_val.shape))
        gemm.replace_all_uses_with(out)
        graph.erase_node(gemm)
        for node in dead:  # GEMM side first, so each is erased after its users
            if not node.users:
                graph.erase_node(node)
        fused += 1
    if fused:
        graph.lint()
    return fused


def compiled_size(size: Any) -> int | None:
    """``size`` as an int: itself when static; when symbolic, the value the graph is being compiled for (its hint,
    which Inductor's own size-dependent choices read); None when data-dependent (no hint)."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    return int(node.hint) if node is not None and node.has_hint() else None


def _combine_weights(node: Any, rows: Any) -> tuple[fx.Node, fx.Node | None] | None:
    """``(w, view)`` when ``node`` is ``w [rows]`` as a column (``unsqueeze(w, -1)`` or a view to ``[rows, 1]``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node_value(node) is None:
        return None
    column = node.target == torch.ops.aten.unsqueeze.default and node.args[1] in (1, -1)
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
    column |= (
        node.target in views and node_value(node).dim() == 2 and statically_known_true(node_value(node).shape[1] == 1)
    )
    w = node.args[0] if column else None
    if not isinstance(w, fx.Node) or node_value(w) is None or node_value(w).dim() != 1:
        return None
    return (w, node) if statically_known_true(node_value(w).shape[0] == rows) else None


def _is_expert_output(node: Any) -> bool:
    """An expert GEMM's output (fused, or left unfused), or that plus a bias (GPT-OSS)."""
    gemms = (torch.ops.moeq.grouped_qmm.default, torch.ops.aten._grouped_mm.default)
    if isinstance(node, fx.Node) and node.target == torch.ops.aten.add.Tensor:
        return any(isinstance(a, fx.Node) and a.target in gemms for a in node.args)
    return isinstance(node, fx.Node) and node.target in gemms


def _match_combine(total: fx.Node) -> tuple[tuple[Any, ...], list[fx.Node]] | None:
    """``(y, w, index, top_k)`` and the nodes made redundant when ``total`` is transformers' grouped-experts
    combine of an expert GEMM's output ``y``: ``sum(view(index(y * w[:, None], [index]), [T, top_k, H]), 1)``."""
    aten = torch.ops.aten
    if total.target != aten.sum.dim_IntList or list(total.args[1:]) != [[1]] or total.kwargs:
        return None
    view = total.args[0]
    if (
        view.target not in (aten.view.default, aten.reshape.default)
        or node_value(view) is None
        or node_value(view).dim() != 3
    ):
        return None
    gathered = view.args[0]
    if gathered.target != aten.index.Tensor or len(gathered.args[1]) != 1:
        return None
    weighted, (index,) = gathered.args
    if weighted.target != aten.mul.Tensor or not isinstance(index, fx.Node) or node_value(index) is None:
        return None
    literal = view.args[1][1] if isinstance(view.args[1], (list, tuple)) and len(view.args[1]) == 3 else None
    # the view's literal top-k when its size is symbolic
    top_k = literal if isinstance(literal, int) and literal > 0 else node_value(view).shape[1]
    for y, column in (weighted.args, reversed(weighted.args)):
        y_val = node_value(y)
        if not _is_expert_output(y) or y_val is None or y_val.dim() != 2:
            continue
        found = _combine_weights(column, y_val.shape[0])
        if found is None:
            continue
        w, column = found
        same_rows = statically_known_true(node_value(index).shape[0] == y_val.shape[0])
        if not same_rows or not isinstance(top_k, int) or node_value(index).dtype not in (torch.int32, torch.int64):
            return None
        if not combine_pays(y_val.shape[0], top_k):
            logger.info("moeq: top-%d combine over %s rows left to Inductor (no faster there)", top_k, y_val.shape[0])
            return None
        if node_value(total).dtype != torch.promote_types(y_val.dtype, node_value(w).dtype):
            return None
        if any(len(n.users) != 1 for n in (view, gathered, weighted)):
            return None
        return (y, w, index, top_k), [view, gathered, weighted, column]
    return None


def _cast_of(node: fx.Node) -> fx.Node | None:
    """The one user of ``node`` when it only casts it to another float dtype (Mixtral's ``.to(bf16)`` of its fp32
    combine)."""
    (user,) = node.users if len(node.users) == 1 else (None,)
    cast = user is not None and user.target == torch.ops.prims.convert_element_type.default
    return (
        user
        if cast and node_value(user) is not None and node_value(user).dtype in (torch.bfloat16, torch.float16)
        else None
    )


def fuse_expert_combine(graph: fx.Graph) -> int:
    """Replace transformers' grouped-experts combine after an expert GEMM (routing-weight scaling, un-permute,
    top-k sum, and a cast of the sum that follows) by ``moeq::combine_experts`` (one pass over the rows, read as
    contiguous runs: Inductor's fused gather reads them an element at a time); returns the count."""
    fused = 0
    for total in [n for n in graph.nodes if n.target == torch.ops.aten.sum.dim_IntList]:
        matched = _match_combine(total)
        if matched is None:
            continue
        args, dead = matched
        cast = _cast_of(total)
        result = cast or total
        with graph.inserting_before(total):
            combine = graph.call_function(torch.ops.moeq.combine_experts.default, (*args, node_value(result).dtype))
        with_node_value(combine, node_value(result))
        result.replace_all_uses_with(combine)
        graph.erase_node(result)
        if cast is not None:
            graph.erase_node(total)
        for node in dead:
            if not node.users:
                graph.erase_node(node)
        fused += 1
        logger.info("moeq: MoE combine after %s fused into moeq::combine_experts", args[0].name)
    if fused:
        graph.lint()
    return fused


def _repeated_rows(node: Any) -> tuple[fx.Node, int] | None:
    """``(g, k)`` when ``node`` is ``g [T, H]`` with each row repeated ``k`` times (``[T * k, H]``): a view of
    ``expand(unsqueeze(g, 1), [T, k, H])`` (materialized by a clone or not), the form autograd gives the gradient
    of a top-k sum."""
    aten = torch.ops.aten
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    if (
        not isinstance(node, fx.Node)
        or node.target not in views
        or node_value(node) is None
        or node_value(node).dim() != 2
    ):
        return None
    expand = node.args[0]
    if isinstance(expand, fx.Node) and expand.target == aten.clone.default:
        expand = expand.args[0]
    if not isinstance(expand, fx.Node) or expand.target != aten.expand.default or len(expand.args[1]) != 3:
        return None
    top_k, column = expand.args[1][1], expand.args[0]
    if not isinstance(top_k, int) or column.target != aten.unsqueeze.default or column.args[1] != 1:
        return None
    g = column.args[0]
    if (
        node_value(g) is None
        or node_value(g).dim() != 2
        or not statically_known_true(node_value(node).shape[1] == node_value(g).shape[1])
    ):
        return None
    return g, top_k


def _weight_column(node: Any, rows: Any) -> tuple[fx.Node, None] | None:
    """``(node, None)`` when ``node`` is a ``[rows, 1]`` float column the graph does not build from a 1-D tensor
    (a backward graph's saved ``w[:, None]``)."""
    val = node_value(node)
    column = val is not None and val.dim() == 2 and val.is_floating_point()
    column = column and statically_known_true(val.shape[0] == rows) and statically_known_true(val.shape[1] == 1)
    return (node, None) if column else None


def _match_combine_backward(gathered: fx.Node) -> tuple[tuple[Any, ...], fx.Node, fx.Node, list[fx.Node]] | None:
    """``((g, y, w, index, top_k), dy, total, dead)`` when ``gathered = g_rows[index]`` (``g_rows``: the token
    gradient ``g`` repeated ``top_k`` times) feeds exactly the combine's two gradients: ``dy = gathered * w[:, None]``
    and ``total = sum(gathered * y, 1)``."""
    aten = torch.ops.aten
    if gathered.target != aten.index.Tensor or len(gathered.args[1]) != 1 or len(gathered.users) != 2:
        return None
    repeated, (index,) = gathered.args
    found = _repeated_rows(repeated)
    rows_val = node_value(gathered)
    if (
        found is None
        or rows_val is None
        or node_value(index) is None
        or node_value(index).dtype not in (torch.int32, torch.int64)
    ):
        return None
    g, top_k = found
    dy = total = y = w = column = None
    for mul in gathered.users:
        if mul.target != aten.mul.Tensor or len(mul.args) != 2:
            return None
        other = mul.args[1] if mul.args[0] is gathered else mul.args[0]
        weights = _combine_weights(other, rows_val.shape[0]) or _weight_column(other, rows_val.shape[0])
        (user,) = mul.users if len(mul.users) == 1 else (None,)
        if weights is not None:
            dy, (w, column) = mul, weights
        elif user is not None and user.target == aten.sum.dim_IntList and list(user.args[1]) in ([1], [-1]):
            total, y = user, other
        else:
            return None
    if dy is None or total is None or total.kwargs or node_value(y) is None or node_value(y).dim() != 2:
        return None
    if not all(statically_known_true(a == b) for a, b in zip(node_value(y).shape, rows_val.shape)):
        return None
    if not combine_pays(rows_val.shape[0], top_k):
        logger.info("moeq: top-%d combine backward over %s rows left to Inductor", top_k, rows_val.shape[0])
        return None
    g_dtype = node_value(g).dtype
    dtypes = (torch.promote_types(g_dtype, node_value(w).dtype), torch.promote_types(g_dtype, node_value(y).dtype))
    if (node_value(dy).dtype, node_value(total).dtype) != dtypes or rows_val.dtype != g_dtype:
        return None
    return (g, y, w, index, top_k), dy, total, [total.args[0], gathered, *([column] if column else []), repeated]


def fuse_combine_backward(graph: fx.Graph) -> int:
    """Replace the combine's two gradients in a training graph's backward (the routed rows' ``dy`` and the routing
    weights' ``dw``, each a kernel that gathers the token gradient) by one ``moeq::combine_experts_backward``;
    returns the count. The gathered form is what :mod:`moeq.lowering.permutation` leaves of autograd's scatter."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    fused = 0
    for gathered in [n for n in graph.nodes if n.target == torch.ops.aten.index.Tensor]:
        matched = _match_combine_backward(gathered)
        if matched is None:
            continue
        args, dy, total, dead = matched
        first_use = min(dy, total, key=order.__getitem__)
        if any(order[a] > order[first_use] for a in args if isinstance(a, fx.Node)):
            continue  # an operand is computed after one of the gradients: keep Inductor's kernels
        g, y, w, index, top_k = args
        dw_val = node_value(total).squeeze(-1) if node_value(total).dim() == 2 else node_value(total)
        with graph.inserting_before(first_use):
            if node_value(w).dim() == 2:  # a saved column: its [S] view
                w = with_node_value(
                    graph.call_function(torch.ops.aten.reshape.default, (w, [-1])), node_value(w).reshape(-1)
                )
            both = graph.call_function(torch.ops.moeq.combine_experts_backward.default, (g, y, w, index, top_k))
            with_node_value(both, (node_value(dy), dw_val))
            dy_new = with_node_value(graph.call_function(operator.getitem, (both, 0)), node_value(dy))
            dw_new = with_node_value(graph.call_function(operator.getitem, (both, 1)), dw_val)
            if node_value(total).dim() == 2:
                dw_new = with_node_value(
                    graph.call_function(torch.ops.aten.unsqueeze.default, (dw_new, -1)), node_value(total)
                )
        dy.replace_all_uses_with(dy_new)
        total.replace_all_uses_with(dw_new)
        for node in [dy, total, *dead]:
            if not node.users:
                graph.erase_node(node)
        order = {node: i for i, node in enumerate(graph.nodes)}
        fused += 1
        logger.info("moeq: MoE combine backward over %s fused into moeq::combine_experts_backward", args[1].name)
    if fused:
        graph.lint()
    return fused


def _switches(module: Any, *private: str) -> tuple[tuple[str, str], ...]:
    """A module's public upper-case settings of plain types (bounds, on/off switches, mode tables) and the named
    private ones (those a context manager sets), as reprs."""
    plain = (bool, int, float, str, dict, tuple)
    items = sorted(vars(module).items())
    return tuple(
        (name, repr(value))
        for name, value in items
        if (name.isupper() and not name.startswith("_") or name in private) and type(value) in plain
    )


@functools.cache
def _lowering_sources() -> bytes:
    """One hash of every moeq source file whose code runs while Inductor compiles a moeq graph: the passes, the
    ``triton_op`` bodies traced into the graph, the launchers they call and the numerics they read
    (``moeq/lowering``, ``moeq/runtime``, ``moeq/formats.py``)."""
    package = Path(__file__).resolve().parents[1]
    files = [package / "formats.py", *(f for d in ("lowering", "runtime") for f in (package / d).rglob("*.py"))]
    return get_hash_for_files(tuple(sorted(map(str, files))))


def compile_fingerprint() -> tuple[Any, ...]:
    """The ``uuid`` of moeq's Inductor passes: everything beyond the graph itself that decides the code Inductor
    generates for a moeq graph, so that its FX graph and AOTAutograd caches never serve code compiled under other
    settings. The source of the passes and of the ``triton_op`` bodies they trace, the fusion policy and combine
    switch, and the settings read at trace time: fusion bounds, the launchers' kernel choices (e.g.
    ``grouped_qmm.GLUON_QAT_NVFP4``, which decides between the Gluon kernel and a weight pass) and
    :func:`moeq.lowering.ops.reference_kernels`."""
    from moeq.lowering import gather_quant, ops

    settings = [
        _switches(sys.modules[__name__], "_POLICY", "_COMBINE"),
        _switches(gather_quant),
        _switches(ops, "_TRITON_ENABLED"),
    ]
    with contextlib.suppress(ImportError):  # without triton the reference ops run and nothing else decides
        from moeq.runtime.kernels import grouped_qmm as launcher

        settings.append(_switches(launcher))
    return (_lowering_sources(), *settings)


class GroupedQmmPass(CustomGraphPass):
    """The post-grad pass object installed by the ``moeq`` backend."""

    def __call__(self, graph: fx.Graph) -> None:
        from moeq.lowering.gather_quant import quantize_before_gather

        quantize_before_gather(graph)
        fuse_grouped_qmm(graph)
        if combine_fusion_enabled():
            fuse_expert_combine(graph)
            fuse_combine_backward(graph)

    def uuid(self) -> Any:
        return compile_fingerprint()


class _ComposedPass(CustomGraphPass):
    """Several passes in one slot, run in order; cacheable only if every member is."""

    def __init__(self, passes: list[Any]) -> None:
        self.passes = passes

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = []
        for p in self.passes:
            uid = p.uuid() if isinstance(p, CustomGraphPass) else None
            if uid is None:
                return None
            ids.append(uid)
        return tuple(ids)


def _members(existing: Any) -> list[Any]:
    if existing is None:
        return []
    if isinstance(existing, (list, tuple)):
        return [m for e in existing for m in _members(e)]
    if isinstance(existing, _ComposedPass):
        return list(existing.passes)
    return [existing]


def with_pass(existing: Any, cls: type[CustomGraphPass]) -> Any:
    """``existing`` (None, one pass or a list) with a ``cls()`` appended once, as one object."""
    members = _members(existing)
    if not any(isinstance(m, cls) for m in members):
        members.append(cls())
    return members[0] if len(members) == 1 else _ComposedPass(members)


def with_grouped_qmm_pass(existing: Any) -> Any:
    """``existing`` (None, one pass or a list) with :class:`GroupedQmmPass` appended once, as one object."""
    return with_pass(existing, GroupedQmmPass)
