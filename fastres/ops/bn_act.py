"""``bn_act``: fused BatchNorm + residual add + activation, as ``torch.library`` custom ops.

Two op families share one schema, one fake kernel and one autograd formula (in C++ for the
compiled family, where the Python autograd path would cost as much as a small kernel):

* ``torch.ops.fastres.bn_act_forward`` / ``bn_act_backward``: C++ kernels (CPU and CUDA keys),
  schemas in ``csrc/fastres.cpp``, autograd in ``csrc/bn_act_autograd.cpp``;
* ``torch.ops.fastres.bn_act_forward_triton`` / ``bn_act_backward_triton``: Triton kernels
  (``fastres/triton/bn_act.py``), defined here.

The forward saves only its input, the per-channel statistics and, for ReLU, a 1-bit-per-element
mask; the backward recomputes the normalised input, in one fused reduction pass plus one
elementwise pass. SiLU's backward first recomputes its input ``z = batch_norm(x) + residual`` with
the forward's elementwise pass and applies SiLU's derivative (``aten::silu_backward``); it keeps
references to ``bias`` and ``residual`` for that, tensors that exist anyway.

In training the forward op updates the running statistics in place, as ATen's
``native_batch_norm`` does (its schema says so, so ``torch.compile`` functionalizes it): inside
the op, before autograd saves the op's tensors. ``torch.utils.checkpoint`` stops recomputing a
segment at the last saved tensor; an update made after the op would then be skipped where
``nn.BatchNorm2d``'s is recomputed (running statistics would differ from the library's model).
``torch.library.register_autograd`` takes functional ops only, so the Triton forward's autograd
is installed with the same helper it uses (see :func:`register_mutating_autograd`).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.activation import apply_activation, check_activation
from fastres.backends import STATUS, resolve_backend
from fastres.batch_norm import (
    require_more_than_one_value,
    update_running_stats,
    values_per_channel,
)
from fastres.ops.registry import op, register_reference

__all__ = [
    "bn_act",
    "bn_act_forward_reference",
    "bn_act_reference",
    "check_args",
    "register_mutating_autograd",
    "silu_input_grad",
]

_ACTIVATION_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Public entry point


def bn_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    residual: Tensor | None = None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """``activation(batch_norm(x) + residual)`` in one fused op, with ``F.batch_norm``'s
    semantics.

    Args:
        x: activations, shape ``(N, C, H, W)``, float32, float16 or bfloat16 (float64 on the
            ``cpu`` and ``torch`` backends), NCHW-contiguous or channels_last (any other strides
            are copied once).
        weight, bias: affine parameters, shape ``(C,)``, or None (``affine=False``). float32
            (float64 for float64 ``x``), as autocast leaves BatchNorm's parameters.
        running_mean, running_var: shape ``(C,)``, same dtype as ``weight``, or None
            (``track_running_stats=False``). In training they are updated in place with the batch
            mean and the unbiased batch variance and factor ``momentum`` (inside the op, as
            ``F.batch_norm`` does, so activation checkpointing recomputes the update as it does
            ``nn.BatchNorm2d``'s); in eval they normalise ``x`` and are required.
        residual: added after the normalisation, same shape, dtype and device as ``x``, or None.
        training: batch statistics (True) or running statistics (False).
        momentum: running-statistics factor. ``nn.BatchNorm2d``'s ``momentum=None`` (cumulative
            average) is resolved by the module layer into ``1 / num_batches_tracked``.
        eps: added to the variance before the square root.
        activation: ``"relu"``, ``"silu"`` or ``"identity"``, applied after the residual add.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see
            :mod:`fastres.backends`).

    Returns:
        A new tensor with the shape, dtype and memory format of ``x``. Differentiable with respect
        to ``x``, ``weight``, ``bias`` and ``residual``.
    """
    check_args(x, weight, bias, running_mean, running_var, residual, training, momentum, eps)
    check_activation(activation, "bn_act")
    name = resolve_backend(backend, x.device, x.dtype)
    out, _, _, _ = op("bn_act_forward", name)(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
    )
    return out


def bn_act_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    residual: Tensor | None = None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
) -> Tensor:
    """The ``torch`` backend: ``F.batch_norm``, add and the activation as PyTorch runs them
    eagerly."""
    return _composition(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
    )


def _composition(
    x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
) -> Tensor:
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation)


@register_reference("bn_act_forward")
def bn_act_forward_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bn_act_forward`` of the ``torch`` backend: :func:`bn_act_reference`, with the op's
    results. The statistics are the batch mean and biased variance (training) or copies of the
    running ones; the mask is empty (autograd keeps what the composition needs)."""
    out = _composition(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
    )
    if training:
        var, mean = torch.var_mean(x.detach().to(param_dtype_of(x)), dim=(0, 2, 3), correction=0)
    else:
        assert running_mean is not None and running_var is not None  # check_args: eval needs them
        mean, var = running_mean.clone(), running_var.clone()
    return out, mean, var, x.new_empty((0,), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Argument checks (every backend); each error names the argument and what was expected.


def check_args(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    residual,
    training,
    momentum,
    eps,
    local_batch=False,
    who="bn_act",
):
    """Raises, naming the argument and ``who`` (the op the caller called), on anything the ops
    do not take. ``local_batch``: x is one process's share of the batch (synchronized
    BatchNorm), so the "more than one value per channel" rule applies to the whole batch and is
    checked later."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{who}: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D "
            f"with shape {tuple(x.shape)}"
        )
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"{who}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != (channels,):
            raise ValueError(
                f"{who}: {name} must have shape ({channels},) to match the "
                f"channels of x, got {tuple(t.shape)}"
            )
        if t.dtype != param_dtype:
            raise TypeError(
                f"{who}: {name} must be {param_dtype} for {x.dtype} activations, got {t.dtype}"
            )
        if t.device != x.device:
            raise ValueError(f"{who}: {name} must be on {x.device} like x, got {t.device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(
                f"{who}: residual must be a Tensor or None, got {type(residual).__name__}"
            )
        if residual.shape != x.shape:
            raise ValueError(
                f"{who}: residual must have the shape of x {tuple(x.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(
                f"{who}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}"
            )
        if residual.device != x.device:
            raise ValueError(f"{who}: residual must be on {x.device} like x, got {residual.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{who}: running_mean and running_var must both be tensors or both be None"
        )
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(
            f"{who}: momentum must be a float (for nn.BatchNorm2d's momentum=None, "
            f"pass 1 / num_batches_tracked), got {momentum!r}"
        )
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{who}: eps must be a positive float, got {eps!r}")
    if training:
        if not local_batch:
            require_more_than_one_value(x.size())
    elif running_mean is None:
        raise ValueError(f"{who}: running_mean and running_var are required when training=False")


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes, dtypes and strides only), shared by both op families


def _forward_fake(
    x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
):
    check_activation(activation, "bn_act_forward")
    relu = activation == "relu"
    fmt = memory_format_of(x)
    channels = x.shape[1]
    out = torch.empty_like(x, memory_format=fmt)
    mean = x.new_empty((channels,), dtype=param_dtype_of(x))
    var = x.new_empty((channels,), dtype=param_dtype_of(x))
    mask = x.new_empty(((x.numel() + 7) // 8 if relu else 0,), dtype=torch.uint8)
    return out, mean, var, mask


def _backward_fake(
    grad_out, x, weight, save_mean, save_var, relu_mask, training, eps, relu, residual_grad
):
    fmt = memory_format_of(x)
    channels = x.shape[1]
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_weight = x.new_empty((channels,), dtype=param_dtype_of(x))
    grad_bias = x.new_empty((channels,), dtype=param_dtype_of(x))
    grad_residual = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty((0,))
    return grad_x, grad_weight, grad_bias, grad_residual


# ---------------------------------------------------------------------------------------------
# Autograd of the Triton op family (the compiled family's is the same formula, in C++)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _running_mean, _running_var, training, _momentum, eps, activation = (
        inputs
    )
    _out, mean, var, mask = output
    ctx.mark_non_differentiable(mean, var, mask)
    silu = activation == "silu"
    ctx.save_for_backward(
        x, weight, mean, var, mask, bias if silu else None, residual if silu else None
    )
    ctx.training, ctx.eps, ctx.activation = training, eps, activation
    ctx.has_weight, ctx.has_bias, ctx.has_residual = (
        weight is not None,
        bias is not None,
        residual is not None,
    )


def silu_input_grad(forward_op, grad_out, x, weight, bias, residual, mean, var, eps) -> Tensor:
    """SiLU's gradient at its input ``z = batch_norm(x) + residual``: ``z`` is recomputed by
    ``forward_op`` (a ``bn_act_forward``) in eval mode with the saved statistics, the training
    forward's arithmetic (the CPU kernels' training forward also corrects for the rounding of
    the saved float32 mean, which this cannot), so no per-element tensor is kept for SiLU."""
    z, *_ = forward_op(x, weight, bias, residual, mean, var, False, 0.0, eps, "identity")
    return torch.ops.aten.silu_backward(grad_out, z)


def grad_through_activation(
    forward_op, grad_out, x, weight, bias, mean, var, eps, activation
) -> tuple[Tensor, Tensor]:
    """For ``activation(batch_norm(x))`` with the given statistics: the gradient at the
    activation's input, and the packed ReLU mask ``bn_act_backward`` takes (empty unless
    ``activation`` is ReLU). Both recomputed from ``x`` with ``forward_op`` (a
    ``bn_act_forward``), for ops that keep no per-element tensor for the activation."""
    mask = x.new_empty((0,), dtype=torch.uint8)
    if activation == "silu":
        return silu_input_grad(forward_op, grad_out, x, weight, bias, None, mean, var, eps), mask
    if activation == "relu":  # the mask of relu(batch_norm(x))
        _, _, _, mask = forward_op(x, weight, bias, None, mean, var, False, 0.0, eps, "relu")
    return grad_out, mask


def _make_backward(forward_op, backward_op):
    """The backward of ``forward_op``. SiLU's input ``z`` is recomputed by ``forward_op`` itself
    in eval mode with the saved statistics (see :func:`silu_input_grad`)."""

    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_mask):
        x, weight, mean, var, mask, bias, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        residual_grad = ctx.has_residual and needs[3]
        if ctx.activation == "silu":
            grad_out = silu_input_grad(
                forward_op, grad_out, x, weight, bias, residual, mean, var, ctx.eps
            )
        relu = ctx.activation == "relu"
        grad_x, grad_weight, grad_bias, grad_residual = backward_op(
            grad_out, x, weight, mean, var, mask, ctx.training, ctx.eps, relu, residual_grad
        )
        return (
            grad_x if needs[0] else None,
            grad_weight if ctx.has_weight and needs[1] else None,
            grad_bias if ctx.has_bias and needs[2] else None,
            grad_residual if residual_grad else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )

    return backward


def _register_fakes(forward_op, backward_op) -> None:
    torch.library.register_fake(forward_op, _forward_fake)
    torch.library.register_fake(backward_op, _backward_fake)


def register_mutating_autograd(library, forward_op, backward, setup_context) -> None:
    """Installs ``forward_op``'s autograd: the formula ``torch.library.register_autograd`` would
    install, with the helper it installs it with. register_autograd refuses an op that mutates
    its inputs (the running statistics); autograd never sees them (no gradient flows to them)."""
    from torch._library.autograd import Info, make_autograd_impl

    impl = make_autograd_impl(forward_op, Info(backward, setup_context))
    library.impl(forward_op._opname, impl, "Autograd", with_keyset=True)


def _register_triton_autograd(forward_op, backward_op) -> None:
    register_mutating_autograd(
        _TRITON_LIBRARY, forward_op, _make_backward(forward_op, backward_op), _setup_context
    )


# ---------------------------------------------------------------------------------------------
# The Triton op family

_TRITON_LIBRARY = torch.library.Library("fastres", "FRAGMENT")
_TRITON_LIBRARY.define(
    "bn_act_forward_triton(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
    "float eps, str activation) -> (Tensor, Tensor, Tensor, Tensor)"
)


def bn_act_forward_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of ``fastres::bn_act_forward`` (same arguments, results and running-statistics
    update); the kernel of ``fastres::bn_act_forward_triton`` on CPU (interpreter) and CUDA."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    check_activation(activation, "bn_act_forward_triton")
    with launch_device(x):
        out, mean, var, mask = kernels.bn_act_forward(
            x, weight, bias, residual, running_mean, running_var, training, eps, activation
        )
    if training:
        update_running_stats(running_mean, running_var, mean, var, momentum, values_per_channel(x))
    return out, mean, var, mask


for _key in ("CPU", "CUDA"):
    _TRITON_LIBRARY.impl("bn_act_forward_triton", bn_act_forward_triton, _key)


@torch.library.custom_op("fastres::bn_act_backward_triton", mutates_args=())
def bn_act_backward_triton(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    relu_mask: Tensor,
    training: bool,
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of ``fastres::bn_act_backward`` (same arguments and results)."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    with launch_device(x):
        return kernels.bn_act_backward(
            grad_out, x, weight, save_mean, save_var, relu_mask, training, eps, relu, residual_grad
        )


_register_fakes(torch.ops.fastres.bn_act_forward_triton.default, bn_act_backward_triton)
_register_triton_autograd(
    torch.ops.fastres.bn_act_forward_triton.default,
    torch.ops.fastres.bn_act_backward_triton.default,
)

if STATUS["cpu"].built:  # the compiled op family exists once fastres._C is loaded
    # Their autograd is registered in C++ (csrc/bn_act_autograd.cpp): it costs less per call.
    _register_fakes(
        torch.ops.fastres.bn_act_forward.default, torch.ops.fastres.bn_act_backward.default
    )
