"""The Triton interpreter (``TRITON_INTERPRET=1``: Triton kernels on CPU tensors, for tests).

Its one capability fastres needs and some versions lack: a run-time scalar (a kernel argument, or
a value computed from ``tl.program_id``) as a ``range()`` bound. The interpreter holds such a
scalar as a one-element NumPy array and turns it into a Python int with ``int(array)``; NumPy 2.5
removed that conversion for arrays that are not 0-dimensional, so under Triton 3.6 every kernel
with a run-time loop bound fails with "only 0-dimensional arrays can be converted to Python
scalars". Triton 3.7's interpreter squeezes the array first.

:func:`loop_bounds_status` probes the capability once, by running a one-program kernel with such
a loop. Where it is missing, it makes the interpreter squeeze as Triton 3.7 does (one attribute
of the interpreter's own per-launch patch of ``tl.tensor``; compiled kernels are untouched) and
probes again. ``fastres.info()`` reports the outcome. Nothing happens unless interpreting.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["loop_bounds_status"]


@triton.jit
def _count_loop_steps_kernel(out_ptr, begin, end):
    steps = 0
    for _ in range(begin + tl.program_id(0), end):
        steps += 1
    tl.store(out_ptr, steps)


def _loop_bounds_work() -> bool:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_loop_steps_kernel[(1,)](out, 2, 7)
    except Exception as error:  # the interpreter wraps the TypeError in an InterpreterError
        if "0-dimensional" not in str(error):
            raise
        return False
    if out.item() != 5:
        raise RuntimeError(f"the Triton interpreter ran a 5-step loop {out.item()} times")
    return True


def _squeeze_loop_bounds() -> None:
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


@functools.cache
def loop_bounds_status() -> str:
    """How the interpreter runs run-time loop bounds: ``"native"`` or ``"repaired"``.

    Call only while interpreting (``TRITON_INTERPRET=1`` before triton was imported). Raises
    RuntimeError if the repair does not make the probe pass (a Triton whose interpreter changed
    in a way this module does not know): kernels would fail, so fastres says so at once.
    """
    if _loop_bounds_work():
        return "native"
    _squeeze_loop_bounds()
    if not _loop_bounds_work():
        raise RuntimeError(
            f"the Triton {triton.__version__} interpreter cannot run a loop with a run-time bound, "
            "and fastres's repair did not help; use another Triton version for TRITON_INTERPRET=1"
        )
    return "repaired"
