"""The Triton interpreter suite: TRITON_INTERPRET must be set before triton is first imported, so these
tests run in their own pytest process (`make test-interpret`), never together with the main suite.

Three costs of Triton's interpreter (3.6 and 3.9 alike) that say nothing about moeq's kernels are taken out here,
without changing what any kernel computes (the suite: 237 -> 93 s on two workers, session 58):

- every call of a ``@triton.jit`` helper inside a kernel patches ``triton.language`` again for the interpreter
  (five ``inspect.getmembers`` scans, ~0.35 ms), although the launch already patched those very modules and undoes
  the patch when the kernel returns: a quarter of the suite's time, as moeq's kernels call small helpers per tile;
- a ``tl.reduce`` with a combine function of its own folds element by element in Python (``max_keeping_nan``, the
  NVFP4 block amax, took 40% of ``test_nvfp4_weight_codes_bit_exact``). :func:`_fold_whole_slices` folds the same
  values in the same order, one slice of the reduced axis at a time, for the combine functions listed in
  ``ELEMENTWISE_COMBINE_FNS`` (branch-free: a block's truth value is not an element's);
- ``_get_np_dtype`` builds its table of 19 Triton dtypes at every call (~35 us, 150,000 calls in two tests): cached.
"""

from __future__ import annotations

import inspect
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from moeq.runtime.kernels import numerics  # noqa: E402

#: combine functions that use only elementwise ``tl`` ops, so they may combine whole slices at once
ELEMENTWISE_COMBINE_FNS = (numerics.max_keeping_nan,)


def _language_modules(fn) -> frozenset[int]:
    """The language modules ``fn``'s globals hold (those Triton's ``_patch_lang`` patches for it)."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def _patch_language_once_per_launch() -> None:
    """A launch patches ``triton.language`` (and restores it on return); a helper called inside it gets an empty
    patch where its modules are patched already: by the launch, or by an earlier helper of the launch that saw one
    more (Triton never undoes a helper's patch)."""
    patch_language = interpreter._patch_lang
    modules_of: dict = {}  # jit function -> the language modules it sees
    launch_modules: set[int] | None = None  # while a kernel runs: the language modules patched for it

    def patch_once(fn):
        nonlocal launch_modules
        langs = modules_of.get(fn)
        if langs is None:
            langs = modules_of[fn] = _language_modules(fn)
        if launch_modules is not None and langs <= launch_modules:
            return interpreter._LangPatchScope()
        scope = patch_language(fn)
        if launch_modules is not None:  # a helper that sees a module the launch did not patch: patched as Triton does
            launch_modules |= langs
            return scope
        launch_modules = set(langs)
        restore = scope.restore

        def restore_and_end_launch() -> None:
            nonlocal launch_modules
            launch_modules = None
            restore()

        scope.restore = restore_and_end_launch
        return scope

    interpreter._patch_lang = patch_once


def _as_shape(value, like: np.ndarray) -> np.ndarray:
    """``value`` (a combine step's result: an array, or a Python number) in ``like``'s shape and dtype."""
    value = np.asarray(value)
    value = value.reshape(like.shape) if value.size == like.size else np.broadcast_to(value, like.shape)
    return value.astype(like.dtype)


def _fold_whole_slices(self, input):
    """``ReduceOps.generic_reduce`` for an elementwise combine function: the fold over the reduced axis in the same
    order (element 0, then 1, ...), each step on every output element at once."""
    keep_dims, original_axis = self.keep_dims, self.axis
    input, axis = self.unravel(input, self.axis)
    data = [arg.handle.data for arg in input]
    acc = [np.asarray(np.take(d, 0, axis=axis)) for d in data]
    for i in range(1, data[0].shape[axis]):
        step = self.combine_fn.fn(
            *(self.to_tensor(a, arg.dtype) for a, arg in zip(acc, input)),
            *(self.to_tensor(np.take(d, i, axis=axis), arg.dtype) for d, arg in zip(data, input)),
        )
        step = step if isinstance(step, tuple) else (step,)
        acc = [_as_shape(s.handle.data if isinstance(s, tl.core.tensor) else s, a) for s, a in zip(step, acc)]
    out = []
    for a, arg in zip(acc, input):
        if keep_dims:
            a = np.expand_dims(a, axis) if original_axis is not None else a.reshape((1,) * data[0].ndim)
        elif original_axis is None:
            a = a.item()
        out.append(self.to_tensor(a, arg.dtype))
    return out


def _fold_elementwise_combines_by_slices() -> None:
    generic_reduce = interpreter.ReduceOps.generic_reduce
    elementwise = {getattr(fn, "fn", fn) for fn in ELEMENTWISE_COMBINE_FNS}

    def reduce(self, input):
        if getattr(self.combine_fn, "fn", None) in elementwise:
            return _fold_whole_slices(self, input)
        return generic_reduce(self, input)

    interpreter.ReduceOps.generic_reduce = reduce


def _cache_numpy_dtypes() -> None:
    """``interpreter._get_np_dtype``, a pure function of a Triton dtype (of a block type: of its element type),
    remembers its answers."""
    get_np_dtype = interpreter._get_np_dtype
    known: dict = {}

    def cached(tt_dtype):
        if isinstance(tt_dtype, tl.block_type):  # unhashable; its numpy dtype is its element type's
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):  # unhashable too, and answered at once
            return get_np_dtype(tt_dtype)
        try:
            return known[tt_dtype]
        except KeyError:
            known[tt_dtype] = get_np_dtype(tt_dtype)
            return known[tt_dtype]

    interpreter._get_np_dtype = cached


_patch_language_once_per_launch()
_cache_numpy_dtypes()
_fold_elementwise_combines_by_slices()


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.interpret)
