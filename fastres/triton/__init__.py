"""Triton kernels and their launchers (the ``triton`` backend).

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, tests) it first makes sure the
interpreter can run them: see :mod:`fastres.triton.interpreter`.
"""

from fastres.backends import triton_interpreting

if triton_interpreting():
    from fastres.triton.interpreter import loop_bounds_status

    loop_bounds_status()
