"""Shared launcher plumbing: input validation, the device / interpreter / reference decision, and
:func:`launch_kernel`, which caches the host work of repeat kernel launches."""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import triton
from torch.fx.experimental.symbolic_shapes import guard_or_false
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from moeq.formats import FLOAT_DTYPES, check_float  # noqa: F401  (the launchers' input checks)

log = logging.getLogger(__name__)

#: Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when these modules are imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor (itself when it is one already: no dispatch on the launch path)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().float().contiguous()


def known_empty(*sizes: Any) -> bool:
    """Whether a size is known to be 0. A data-dependent (unbacked) size, e.g. a module-list expert's row count
    from ``tokens_per_expert.tolist()``, is not guarded on while Inductor traces the launcher: the kernel is
    launched, and an empty grid launches nothing."""
    return any(guard_or_false(size == 0) for size in sizes)


def interpreting() -> bool:
    return _INTERPRET


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grids, as ``triton.cdiv`` computes it (which is a JIT function: microseconds
    per call); symbolic sizes stay the expression Inductor saw before."""
    return (a + b - 1) // b


#: CUDA's limit on grid dims y and z (the stacked-weight kernels' row tiles and experts)
MAX_GRID_YZ = 65535


def stacked_weight_dims(w: torch.Tensor, contraction_dim: int, what: str) -> tuple[int, int]:
    """``(k_dim, m_dim)`` of a stacked expert weight ``[E, ., .]`` (experts along dim 0) after checking it: a float
    tensor of three dims whose contraction dim is 1 or 2. ``what`` names the launcher in the errors."""
    check_float(w, "w")
    if w.dim() != 3:
        raise ValueError(f"{what} expects a stacked 3-D expert weight, got shape {tuple(w.shape)}")
    k_dim = contraction_dim % 3
    if k_dim == 0:
        raise ValueError("contraction_dim must be 1 or 2 (dim 0 is the expert dim)")
    return k_dim, 3 - k_dim


def check_expert_grid(what: str, w: torch.Tensor, rows: int, block_m: int) -> None:
    """Raise unless a grid of (K tiles, ``rows / block_m`` row tiles, experts) fits CUDA's limits."""
    if w.shape[0] > MAX_GRID_YZ or cdiv(rows, block_m) > MAX_GRID_YZ:
        raise ValueError(
            f"{what}: stacked weight {tuple(w.shape)} needs more than {MAX_GRID_YZ} experts or row tiles of "
            f"{block_m} rows (CUDA's grid limit); split the experts or the rows"
        )


def run_kernel(t: torch.Tensor, launch: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor]):
    """CUDA tensors run the Triton kernel; CPU tensors run it under TRITON_INTERPRET=1, else the reference."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return launch()
    return reference()


def _configs(
    names: tuple[str, str], candidates: list[tuple[int, int, int]], interpreted: tuple[int, int] = (16, 64)
) -> list[triton.Config]:
    """Autotuning candidates ``(block a, block b, warps)``; one small fixed tile under the interpreter."""
    if interpreting():
        return [triton.Config(dict(zip(names, interpreted)))]
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w) for a, b, w in candidates]


def tile_configs() -> list[triton.Config]:
    """Candidates for the elementwise quant kernels (rows x K tiles, warps). The 2-warp tiles lead on the H200
    (``benchmarks/sweep_quant_kernels.py``: NVFP4 0.85-0.87 of copy, FP8 1.00-1.03)."""
    return _configs(
        ("BLOCK_M", "BLOCK_K"),
        [
            (8, 128, 2),
            (16, 128, 2),
            (32, 128, 4),
            (8, 256, 4),
            (16, 128, 4),
            (16, 256, 4),
            (16, 512, 8),
            (32, 256, 8),
            (64, 128, 8),
            (32, 512, 8),
            (64, 256, 8),
        ],
    )


def observer_configs() -> list[triton.Config]:
    """Candidates for segment_amax (rows x K tiles)."""
    return _configs(
        ("BLOCK_S", "BLOCK_K"),
        [
            (32, 256, 4),
            (64, 256, 8),
            (32, 512, 8),
            (64, 512, 8),
            (128, 256, 8),
            (16, 1024, 8),
            (32, 1024, 8),
            (16, 2048, 8),
        ],
    )


def dequant_configs() -> list[triton.Config]:
    """Candidates for the stored-weight dequant (rows x K tiles; K a multiple of 128: NVFP4 decodes whole runs).
    The first is the fixed tile it had before autotuning (NVFP4 at 0.59 of copy, BENCHMARKS.md session 13)."""
    return _configs(
        ("BLOCK_N", "BLOCK_K"),
        [(16, 128, 4), (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (8, 512, 4), (16, 512, 8), (64, 256, 8)],
        interpreted=(16, 128),
    )


def combine_configs() -> list[triton.Config]:
    """Candidates for the MoE combine (tokens x H tiles)."""
    return _configs(
        ("BLOCK_T", "BLOCK_H"),
        [(8, 256, 4), (16, 256, 4), (32, 256, 8), (8, 512, 4), (16, 512, 8), (4, 1024, 4), (32, 128, 4)],
    )


def combine_backward_configs() -> list[triton.Config]:
    """Candidates for the combine's backward (routed rows x H tiles, H walked in a loop)."""
    return _configs(
        ("BLOCK_R", "BLOCK_H"),
        [(8, 256, 4), (16, 256, 4), (32, 256, 8), (16, 512, 8), (8, 512, 4), (32, 128, 4), (64, 128, 8)],
    )


# ----------------------------------------------------------------------------------------------
# launch plans: repeat launches skip Triton's per-call binding, specialization and autotuner lookup
# ----------------------------------------------------------------------------------------------

#: ``MOEQ_FAST_LAUNCH=0`` sends every launch through ``kernel[grid](...)``.
FAST_LAUNCH = os.environ.get("MOEQ_FAST_LAUNCH", "1") != "0"
_MAX_PLANS = 4096
_plans: dict[tuple, _LaunchPlan | None] = {}
_plans_unsupported = False  # set when building a plan fails (a Triton without the internals it reads)
#: launches so far by path: ``planned`` (a repeat), ``first`` (plain, left a plan), ``plain`` (no plan applies:
#: traced, interpreted or non-CUDA calls, or plans off)
launch_counts: Counter[str] = Counter()


class _LaunchPlan:
    """One compiled kernel with the launch arguments that stay fixed for its key: the constexpr tail of the
    argument list (the call's keyword constexprs, the autotuned config's, the defaults) and the grid's meta
    (the scalar arguments by name, as Triton passes them to a grid function)."""

    __slots__ = ("compiled", "meta", "tail")

    def __init__(self, compiled: Any, meta: dict[str, Any], tail: tuple[Any, ...]) -> None:
        self.compiled, self.meta, self.tail = compiled, meta, tail

    def __call__(self, grid: Any, args: tuple[Any, ...]) -> None:
        g = tuple(grid(self.meta) if callable(grid) else grid)
        self.compiled[g + (1,) * (3 - len(g))](*args, *self.tail)


def _plan_key(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple | None:
    """Everything Triton's specialization and autotuning read from a call: each tensor's dtype and 16-byte
    alignment, every other argument's type and value, the keyword constexprs, the current device. None where
    no plan applies: a wrapped (traced) or interpreted kernel, or a tensor that is not a plain CUDA tensor."""
    if not FAST_LAUNCH or _plans_unsupported or not isinstance(kernel, (Autotuner, JITFunction)):
        return None
    signature, on_cuda = [], False
    for a in args:
        if isinstance(a, torch.Tensor):
            if (type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter) or not a.is_cuda:
                return None
            signature.append((a.dtype, a.data_ptr() % 16 == 0))
            on_cuda = True
        else:
            signature.append((type(a), a))
    if not on_cuda:
        return None
    return id(kernel), torch.cuda.current_device(), tuple(signature), tuple(kwargs.items())


def _build_plan(kernel: Any, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _LaunchPlan | None:
    """The plan for a call that has just run through ``kernel[grid]`` (so it is compiled and autotuned)."""
    options, fn = {}, kernel
    if isinstance(kernel, Autotuner):
        options, fn = kernel.best_config.all_kwargs(), kernel.fn
    if not isinstance(fn, JITFunction):  # e.g. heuristics, which compute arguments per call
        return None
    compiled = fn.run(*args, grid=grid, warmup=True, **kwargs, **options)
    defaults = inspect.signature(fn.fn).parameters
    given = {**kwargs, **options}
    tail = tuple(given[n] if n in given else defaults[n].default for n in fn.arg_names[len(args) :])
    if inspect.Parameter.empty in tail:
        return None
    meta = {n: v for n, v in zip(fn.arg_names, (*args, *tail)) if not isinstance(v, torch.Tensor)}  # holds no tensor
    return _LaunchPlan(compiled, meta, tail)


def launch_kernel(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``. The first call with a new argument signature (:func:`_plan_key`) runs
    exactly that and keeps the compiled kernel; repeats launch it directly, which saves most of Triton's host
    time per call (binding, specialization, cache and autotuner lookups). Positional arguments are the
    kernel's leading parameters (tensors and ints), keywords its constexprs."""
    global _plans_unsupported
    key = _plan_key(kernel, args, kwargs)
    plan = _plans.get(key, False) if key is not None else None
    if plan:
        launch_counts["planned"] += 1
        plan(grid, args)
        return
    launch_counts["first" if plan is False else "plain"] += 1
    kernel[grid](*args, **kwargs)
    if plan is False:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        try:
            _plans[key] = _build_plan(kernel, grid, args, kwargs)
        except Exception as err:  # a Triton without the internals plans read: launch the plain way from now on
            log.warning("moeq: cached kernel launches are off (%s: %s)", type(err).__name__, err)
            _plans_unsupported = True
