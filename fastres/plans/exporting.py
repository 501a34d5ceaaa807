"""Whether a model is being traced or exported, when blocks must run the library's own forward.

The fused ops and folded convolutions are fastres custom ops and oneDNN prepacked calls: no ONNX
exporter translates them, ``torch.jit.trace`` cannot record a prepacked convolution, and an
exported program holding them would need fastres wherever it runs. While a model is traced or
exported, every block and stem therefore runs its library's forward (ATen ops only), and the
result is the library's model. What each tracer sets (checked with torch 2.13):

* ``torch.jit.trace``: ``torch.jit.is_tracing()``;
* ``torch.onnx.export(dynamo=False)``: ``is_tracing()`` and ``torch.onnx.is_in_onnx_export()``;
* ``torch.onnx.export(dynamo=True)``: ``is_in_onnx_export()`` and
  ``torch.compiler.is_exporting()``;
* ``torch.export.export``, strict and non-strict: ``is_exporting()``.

``torch.compile`` sets none of them (only ``torch.compiler.is_compiling()``): compiled models
keep the fused ops, which have fake kernels for it. torch 2.11's ``torch.compile`` folds
``is_exporting()`` to True while it traces (later versions read the flag it returns), which
would make every compiled model run the library's forward; :func:`exporting` reads that flag
itself.
"""

from __future__ import annotations

import torch

__all__ = ["tracing_or_exporting"]


def tracing_or_exporting() -> bool:
    """True while ``torch.jit.trace``, ``torch.export.export`` or either ONNX exporter runs the
    model (see the list above)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting()


def exporting() -> bool:
    """``torch.compiler.is_exporting()``, also while ``torch.compile`` traces on torch 2.11: the
    flag that function returns (set by ``torch.export`` around its tracing), read directly where
    it exists, as later versions of ``torch.compile`` read it."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)
