"""Triton kernels and their launchers (the ``triton`` backend).

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, tests) it first makes sure the
interpreter can run them: see :mod:`fastres.triton.interpreter`.
"""

import contextlib

import torch

from fastres.backends import triton_interpreting

if triton_interpreting():
    from fastres.triton.interpreter import loop_bounds_status

    loop_bounds_status()


def launch_device(tensor: torch.Tensor):
    """The context to launch Triton kernels for ``tensor`` in: its CUDA device made current.

    Triton launches on the current CUDA device; tensors on ``cuda:1`` while ``cuda:0`` is current
    would be read at addresses that are not theirs. A no-op for CPU tensors (the interpreter).
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
