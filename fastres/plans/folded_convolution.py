"""The folded convolutions of folded eval: each convolution run once, with its BatchNorm folded
in (:func:`fastres.fold_bn`) and its bias, the residual add and the activation (ReLU, SiLU)
fused into it: oneDNN post-ops on CPU (``mkldnn::_convolution_pointwise``, weights prepacked),
cuDNN's fused convolution + bias + add + ReLU on CUDA (``aten::cudnn_convolution_add_relu``), or
the Triton convolution's epilogue on the triton backend. A residual added after the activation
(Ultralytics' YOLO Bottleneck) is oneDNN's eltwise then binary-add post-ops through
fastres._onednn (csrc/onednn/folded_convolution.cpp) on CPU, and the Triton epilogue.

The folded weights are cached per block under a key built from every tensor they depend on
(identity, version counter, dtype, device), so any change (an optimizer step,
``load_state_dict``, an in-place edit, ``.to()``) is seen on the next call and the weights are
folded again.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastres.activation import apply_activation
from fastres.backends import onednn_convolution_class
from fastres.folding import fold_bn
from fastres.plans.decisions import count_call

__all__ = [
    "FoldedBlock",
    "FoldedStage",
    "folding_description",
    "folding_kind",
    "onednn_kernels",
    "onednn_verbose_log",
]


# Input shapes each folded convolution keeps a prepacked weight for (see FoldedStage._packed_for).
PACKED_SHAPES = 4


class FoldedStage:
    """One folded convolution: its weight and bias, and the fused kernel that runs it.

    ``kind`` is ``"onednn"`` (CPU: ``mkldnn::_convolution_pointwise``, the weight prepacked for
    each input shape it meets), ``"cudnn"`` (CUDA: ``aten::cudnn_convolution_relu`` /
    ``cudnn_convolution_add_relu``, one fused cuDNN call each) or ``"triton"`` (the Triton
    implicit-GEMM convolution with its bias + residual + ReLU epilogue).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, kind: str):
        self.conv, self.kind = conv, kind
        # Folded in float32 at least (float64 for a float64 model), whatever the model's dtype;
        # cast once per activation dtype by _in_dtype.
        with torch.no_grad():
            wide = torch.promote_types(conv.weight.dtype, torch.float32)
            self.weight, self.bias = fold_bn(conv, bn, dtype=wide)
        # oneDNN weights prepacked per (input shape, dtype), the most recently used last.
        self.packed: OrderedDict[tuple[tuple[int, ...], torch.dtype], Tensor] = OrderedDict()
        self._cast: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        self._packing = threading.Lock()
        # fastres._onednn's convolutions for the residual after the activation, by activation,
        # built on first use.
        self._onednn_fused: dict[str, Any] = {}

    def run(
        self,
        x: Tensor,
        *,
        activation: str,
        residual: Tensor | None = None,
        into_residual: bool = False,
    ) -> Tensor:
        """``activation(conv(x) + bias + residual)``, ``activation`` one of
        :data:`fastres.activation.ACTIVATIONS`.

        ``into_residual=True`` says ``residual`` is a buffer the network owns and no longer
        needs: on oneDNN the result is then accumulated into it (the in-place sum post-op) and
        it is returned, saving the allocation of a new output. Never pass a caller's tensor."""
        weight, bias = self._in_dtype(x.dtype)
        if self.kind == "onednn":
            if into_residual and residual is not None and self._sums_in_place(x, residual):
                return self._run_onednn_into(x, bias, activation, residual)
            return self._run_onednn(x, bias, activation, residual)
        c = self.conv
        if self.kind == "triton":
            from fastres.ops.fused_conv2d import conv2d_bias_act_triton

            out: Tensor = conv2d_bias_act_triton(
                x,
                weight,
                bias,
                residual,
                activation,
                c.stride[0],
                c.padding[0],
                c.dilation[0],
                c.groups,
            )
            return out
        return self._run_cudnn(x, weight, bias, activation, residual)

    def run_add_after_activation(self, x: Tensor, *, activation: str, residual: Tensor) -> Tensor:
        """``activation(conv(x) + bias) + residual`` (Ultralytics' YOLO Bottleneck): one oneDNN
        primitive with the eltwise then a binary-add post-op (fastres._onednn's
        FoldedConvolution) on CPU, the Triton epilogue on triton; on cuDNN, and on oneDNN
        where fastres._onednn was not built or for float16, the convolution with its
        activation fused, then the add as its own pass. ``residual`` is only read."""
        c = self.conv
        fused = self._onednn_add_after(x, activation) if self.kind == "onednn" else None
        if fused is not None:
            x = x.contiguous(memory_format=torch.channels_last)
            residual = residual.contiguous(memory_format=torch.channels_last)
            name = "fastres._onednn FoldedConvolution.conv_bias_act_add"
            count_call(name)
            with torch.profiler.record_function(name):  # a class method: no op to profile
                return cast(Tensor, fused.conv_bias_act_add(x, residual))
        weight, bias = self._in_dtype(x.dtype)
        if self.kind == "triton":
            from fastres.ops.fused_conv2d import conv2d_bias_act_add_triton

            out: Tensor = conv2d_bias_act_add_triton(
                x, weight, bias, residual, activation, c.stride[0], c.padding[0],
                c.dilation[0], c.groups,
            )  # fmt: skip
            return out
        if self.kind == "onednn":
            out = self._run_onednn(x, bias, activation, None)
        else:
            out = self._run_cudnn(x, weight, bias, activation, None)
        return out.add_(residual)

    def _onednn_add_after(self, x: Tensor, activation: str) -> Any | None:
        """fastres._onednn's FoldedConvolution for this stage and ``activation`` (built once
        each, from the folded float32 weight), or None where fastres._onednn was not built or
        x is not float32 or bfloat16."""
        cls = onednn_convolution_class()
        if cls is None or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        with self._packing:  # threads serving one model share it
            if activation not in self._onednn_fused:
                padding, stride, dilation, groups = self._onednn_geometry()
                self._onednn_fused[activation] = cls(
                    self.weight.float(), self.bias.float(), stride, padding, dilation, groups,
                    activation,
                )  # fmt: skip
            return self._onednn_fused[activation]

    def _run_cudnn(
        self, x: Tensor, weight: Tensor, bias: Tensor, activation: str, residual: Tensor | None
    ) -> Tensor:
        c = self.conv
        geometry = (list(c.stride), list(c.padding), list(c.dilation), c.groups)
        if activation == "relu" and residual is not None:
            # relu(conv(x) + bias + alpha * residual), one cuDNN call.
            return cast(
                Tensor,
                torch.ops.aten.cudnn_convolution_add_relu(
                    x, weight, residual, 1.0, bias, *geometry
                ),
            )
        if activation == "relu":
            return cast(Tensor, torch.ops.aten.cudnn_convolution_relu(x, weight, bias, *geometry))
        # ATen has no fused cuDNN call for SiLU (or a plain add): the convolution with its bias,
        # then the add and the activation as their own kernels (see CUDNN_UNFUSED).
        out = torch.ops.aten.convolution(x, weight, bias, *geometry[:3], False, [0, 0], c.groups)
        if residual is not None:
            out = out + residual
        return apply_activation(out, activation)

    def _in_dtype(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The folded weight (channels_last) and bias in the activations' dtype (a bfloat16 or
        float16 model, or autocast to one), cast once."""
        if dtype not in self._cast:
            self._cast[dtype] = (
                self.weight.to(dtype).contiguous(memory_format=torch.channels_last),
                self.bias.to(dtype),
            )
        return self._cast[dtype]

    def _onednn_geometry(self) -> tuple[list[int], list[int], list[int], int]:
        c = self.conv
        padding = cast(tuple[int, int], c.padding)  # numeric: string padding is not folded
        return (list(padding), list(c.stride), list(c.dilation), c.groups)

    def _packed_for(self, x: Tensor) -> Tensor:
        """The weight prepacked for oneDNN for x's shape and dtype (bfloat16 weights for
        bfloat16 activations: oneDNN's AMX or AVX512_BF16 kernels). oneDNN picks the weight
        layout by input shape, and a weight packed for another shape is reordered on every call
        (measured: benchmarks/diagnostics.md). The last PACKED_SHAPES shapes keep
        theirs: each is a copy of the weight."""
        shape = (tuple(x.shape), x.dtype)
        with self._packing:  # threads serving one model share this cache
            return self._packed_locked(x, shape)

    def _packed_locked(self, x: Tensor, shape: tuple[tuple[int, ...], torch.dtype]) -> Tensor:
        packed = self.packed.get(shape)
        if packed is None:
            padding, stride, dilation, groups = self._onednn_geometry()
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self._in_dtype(x.dtype)[0],
                    padding,
                    stride,
                    dilation,
                    groups,
                    list(x.shape),
                )
            if len(self.packed) == PACKED_SHAPES:
                self.packed.popitem(last=False)
            self.packed[shape] = packed
        self.packed.move_to_end(shape)
        return packed

    def _sums_in_place(self, x: Tensor, residual: Tensor) -> bool:
        """Whether oneDNN's in-place sum can write this residual: a channels_last buffer in
        x's dtype with a channels_last input (the folded stages' outputs are), not at a 1x1
        output where this torch's binary op cannot take the packed weight (see
        onednn_binary_takes_packed_weight_at_1x1)."""
        return (
            residual.dtype == x.dtype
            and residual.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last)
            and (residual.shape[-2:] != (1, 1) or onednn_binary_takes_packed_weight_at_1x1())
        )

    def _run_onednn_into(
        self, x: Tensor, bias: Tensor, activation: str, residual: Tensor
    ) -> Tensor:
        """``activation(conv(x) + bias + residual)`` written into ``residual``. A new output
        above glibc's mmap threshold (32 MiB, ResNet-50's 256-channel 56x56 maps at batch 16)
        is fresh memory, page-faulted on every call, which costs a large convolution more than
        its arithmetic (measured: benchmarks/diagnostics.md)."""
        after_add = "relu" if activation == "relu" else None  # as in _run_onednn
        out = torch.ops.mkldnn._convolution_pointwise_.binary(
            residual,
            x,
            self._packed_for(x),
            bias,
            *self._onednn_geometry(),
            "add",
            1.0,
            after_add,
            [],
            "",
        )
        if activation == "silu":
            return F.silu(out, inplace=True)
        return cast(Tensor, out)

    def _run_onednn(
        self, x: Tensor, bias: Tensor, activation: str, residual: Tensor | None
    ) -> Tensor:
        geometry = self._onednn_geometry()
        post_op = _ONEDNN_POST_OPS[activation]
        if residual is None:
            return cast(
                Tensor,
                torch.ops.mkldnn._convolution_pointwise(
                    x, self._packed_for(x), bias, *geometry, post_op, [], ""
                ),
            )
        weight = self._packed_for(x)
        if residual.shape[-2:] == (1, 1) and not onednn_binary_takes_packed_weight_at_1x1():
            if x.dtype != torch.float32:
                # That torch's NCHW fallback below ends in ATen's add_relu, which has no
                # bfloat16 or float16 kernel: the convolution alone, then the add and the
                # activation (1x1 outputs: a few values per channel).
                out = torch.ops.mkldnn._convolution_pointwise(
                    x, weight, bias, *geometry, "none", [], ""
                )
                return apply_activation(out + residual, activation)
            # See onednn_binary_takes_packed_weight_at_1x1: NCHW input and plain weight there.
            x, weight = _nchw(x), self._in_dtype(x.dtype)[0].contiguous()
        # ATen's fused oneDNN add takes ReLU after it, and no other activation: SiLU after the add
        # runs as its own pass (see ONEDNN_UNFUSED).
        after_add = "relu" if activation == "relu" else None
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *geometry, "add", 1.0, after_add, [], ""
        )
        return out if after_add is not None else apply_activation(out, activation)


# oneDNN's eltwise post-op for each activation ("swish" with oneDNN's default alpha of 1 is
# x * sigmoid(x), SiLU).
_ONEDNN_POST_OPS = {"identity": "none", "relu": "relu", "silu": "swish"}

# What folded inference on oneDNN runs as a separate pass.
ONEDNN_UNFUSED = "SiLU after the residual add runs as its own pass"

# What folded inference on cuDNN runs as separate kernels: ATen's fused cuDNN calls are
# convolution + bias + ReLU and convolution + bias + add + ReLU only.
CUDNN_UNFUSED = (
    "SiLU, a plain residual add and a residual after the activation run after the convolution "
    "as their own kernels (the triton backend fuses them into its epilogue)"
)


def _nchw(x: Tensor) -> Tensor:
    """x with NCHW strides; at 1x1 spatially a view (the bytes of NCHW and NHWC are the same
    there, only the strides of the size-1 dimensions differ), otherwise a copy if needed."""
    if x.shape[-2:] == (1, 1):
        return x.reshape(x.shape[0], x.shape[1]).view(x.shape)
    return x.contiguous()


@functools.cache
def onednn_binary_takes_packed_weight_at_1x1() -> bool:
    """Whether this torch's fused oneDNN convolution + add (+ ReLU) runs from a prepacked weight
    and a channels_last input when the output is 1x1 spatially (a small image's last stage).

    torch 2.11's ``mkldnn::_convolution_pointwise.binary`` raises "could not create a memory"
    there (torch 2.13's does not); with an NCHW-strided input and the plain weight it is correct
    on both, oneDNN then reordering the weight on each call, which at 1x1 costs little. Probed
    once, on a tiny convolution; reported by ``fastres.info()``.
    """
    x = torch.zeros(1, 8, 1, 1).as_strided((1, 8, 1, 1), (8, 1, 8, 8))  # channels_last strides
    weight = torch.zeros(8, 8, 1, 1)
    geometry = ([0, 0], [1, 1], [1, 1], 1)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(x.shape))
    try:
        torch.ops.mkldnn._convolution_pointwise.binary(
            x, torch.zeros(1, 8, 1, 1), packed, None, *geometry, "add", 1.0, "relu", [], ""
        )
    except RuntimeError:
        return False
    return True


@functools.cache
def onednn_kernels() -> dict[str, str]:
    """The oneDNN kernel a folded convolution runs in each dtype this CPU folds, by name as
    oneDNN reports it (e.g. ``"bfloat16": "brgconv_1x1:avx10_1_512_amx"``): one 1x1
    convolution per dtype run with oneDNN's verbose log on, read from the process's stdout."""
    from fastres.plans.folded_eval import onednn_dtypes

    return {str(dtype).removeprefix("torch."): _onednn_kernel(dtype) for dtype in onednn_dtypes()}


def _onednn_kernel(dtype: torch.dtype) -> str:
    x = torch.zeros(1, 64, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(64, 64, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
    geometry = ([0, 0], [1, 1], [1, 1], 1)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(x.shape))
    log = onednn_verbose_log(
        lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, *geometry, "none", [], "")
    )
    lines = [line.split(",") for line in log if ",exec," in line and ",convolution," in line]
    return lines[-1][6] if lines and len(lines[-1]) > 6 else "unknown"


def onednn_verbose_log(step: Callable[[], object]) -> list[str]:
    """The lines torch's oneDNN logs while ``step()`` runs with its verbose mode on. oneDNN
    writes them to file descriptor 1 from C++: that points at a file for the call."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                step()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return log.readlines()


def folding_description(backend: str) -> str:
    """What folded inference runs on ``backend``, for ``fastres.info()``."""
    kind = folding_kind(backend)
    if kind is None:
        return "not available (no fused convolution for this backend here): eval runs unfolded"
    if kind == "onednn":
        kernels = ", ".join(f"{dtype}: {name}" for dtype, name in onednn_kernels().items())
        text = (
            "oneDNN fused convolution + bias (+ add) (+ ReLU or SiLU), prepacked weights "
            f"({kernels}); " + ONEDNN_UNFUSED + "; " + _onednn_add_after_description()
        )
        if not onednn_binary_takes_packed_weight_at_1x1():
            text += (
                "; where the output is 1x1 the residual-add convolution takes the plain "
                "weight and an NCHW input in float32, and adds the residual after the "
                "convolution in bfloat16 and float16 (this torch's prepacked binary op fails "
                "there)"
            )
        return text
    if kind == "cudnn":
        return f"cuDNN fused convolution + bias (+ add) + ReLU; {CUDNN_UNFUSED}"
    return (
        "Triton implicit-GEMM convolution with a bias (+ add) (+ ReLU or SiLU) epilogue, or "
        "bias, activation, then the add (a residual after the activation)"
    )


def _onednn_add_after_description() -> str:
    if onednn_convolution_class() is None:
        return (
            "a residual after the activation is added in its own pass (fastres._onednn not built)"
        )
    return (
        "a residual after the activation is a binary-add post-op after the eltwise one "
        "(fastres._onednn FoldedConvolution; float32 and bfloat16)"
    )


def _folded_from(conv: nn.Module, bn: nn.Module) -> tuple[Tensor | None, ...]:
    """The tensors a folded convolution is computed from, read from the modules' parameter
    and buffer dicts (what attribute access would return, without nn.Module.__getattr__'s
    cost: this runs for every convolution on every folded call)."""
    found = (
        conv._parameters.get("weight"),
        conv._parameters.get("bias"),
        bn._parameters.get("weight"),
        bn._parameters.get("bias"),
        bn._buffers.get("running_mean"),
        bn._buffers.get("running_var"),
    )
    if found[0] is None or found[4] is None:  # not where nn.Conv2d / BatchNorm keep them
        return tuple(
            getattr(m, name, None)
            for m, name in zip((conv, conv, bn, bn, bn, bn), _FOLDED_FROM, strict=True)
        )
    return found


_FOLDED_FROM = ("weight", "bias", "weight", "bias", "running_mean", "running_var")


def _state_key(tensors: list[Tensor | None]) -> tuple[object, ...]:
    return tuple(
        (None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device))
        for t in tensors
    )


class FoldedBlock:
    """The folded, prepacked convolutions of one fast block, rebuilt whenever the block changes.

    ``pairs`` are the block's (conv, bn) pairs in order; ``downsample`` the pair of its
    downsample branch or None.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._stages: list[FoldedStage] = []
        self._downsample: FoldedStage | None = None

    def stages(
        self,
        pairs: list[tuple[Any, Any]],  # (nn.Conv2d, BatchNorm): the plans checked the types
        downsample: tuple[Any, Any] | None,
        kind: str,
    ) -> tuple[list[FoldedStage], FoldedStage | None]:
        """The stages running on ``kind`` (see :class:`FoldedStage`), folded again if anything they
        depend on changed since the last call."""
        modules = list(pairs) + ([downsample] if downsample else [])
        key = _state_key([t for conv, bn in modules for t in _folded_from(conv, bn)])
        key += tuple(bn.eps for _, bn in modules) + (kind,)
        if key != self._key:
            self._stages = [FoldedStage(conv, bn, kind) for conv, bn in pairs]
            self._downsample = (
                FoldedStage(downsample[0], downsample[1], kind) if downsample else None
            )
            self._key = key
        return self._stages, self._downsample


@functools.cache
def folding_kind(backend: str) -> str | None:
    """The fused convolution that folded inference uses for a fastres backend, or None where
    there is none: oneDNN for ``cpu``, cuDNN for ``cuda``, the Triton epilogue for ``triton``."""
    if backend == "cpu":
        available = torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise"
        )
        return "onednn" if available else None
    if backend == "cuda":
        return "cudnn" if torch.backends.cudnn.is_available() else None
    if backend == "triton":
        return "triton"
    return None
