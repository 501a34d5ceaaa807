"""``bn_act_add``: ``activation(batch_norm(x)) + residual`` in one fused op: the residual added
after the activation, as in Ultralytics' YOLO Bottleneck (``x + cv2(cv1(x))``), where ResNet's
``bn_act`` adds it before.

The op family (fastres/ops/registry.py):

* ``torch.ops.fastres.bn_act_add_forward``: C++ kernels (CPU and CUDA keys), schema in
  ``csrc/fastres.cpp``; the kernels are ``bn_act_forward``'s with the residual added after the
  activation (``apply_run`` in ``csrc/cpu/bn_act_kernel_impl.h``, ``apply_kernel`` in
  ``csrc/cuda/bn_act_kernel.cu``);
* ``torch.ops.fastres.bn_act_add_forward_triton``: Triton kernels (``fastres/triton/bn_act.py``),
  defined here;
* the ``torch`` backend's composition, :func:`bn_act_add_reference`, registered here.

The forward returns ``(out, save_mean, save_var)`` and updates the running statistics in
training inside the op, as ``bn_act_forward`` does. It keeps no mask: the backward (here, for
both families) recomputes the activation's input ``batch_norm(x)`` with the family's
``bn_act_forward`` in eval mode and the saved statistics (SiLU's derivative at it, or ReLU's
mask), then runs ``bn_act_backward`` without a residual; the residual's gradient is the output's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.activation import apply_activation, check_activation
from fastres.backends import STATUS, resolve_backend
from fastres.batch_norm import update_running_stats, values_per_channel
from fastres.ops.bn_act import check_args, grad_through_activation, register_mutating_autograd
from fastres.ops.registry import op, register_reference

__all__ = ["bn_act_add", "bn_act_add_reference"]


def bn_act_add(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    residual: Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "silu",
    backend: str = "auto",
) -> Tensor:
    """``activation(batch_norm(x)) + residual`` in one fused op, with ``F.batch_norm``'s
    semantics.

    Arguments as :func:`fastres.ops.bn_act`'s, but ``residual`` is required (same shape, dtype
    and device as ``x``) and added after the activation; ``activation`` defaults to
    ``"silu"``, Ultralytics' own.

    Returns:
        A new tensor with the shape, dtype and memory format of ``x``. Differentiable with respect
        to ``x``, ``weight``, ``bias`` and ``residual``.
    """
    args = (x, weight, bias, running_mean, running_var, residual, training, momentum, eps)
    check_args(*args, who="bn_act_add")
    if residual is None:
        raise TypeError("bn_act_add: residual must be a Tensor (it is added after the activation)")
    check_activation(activation, "bn_act_add")
    name = resolve_backend(backend, x.device, x.dtype)
    out, _, _ = op("bn_act_add_forward", name)(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
    )
    return out


@register_reference("bn_act_add_forward")
def bn_act_add_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``bn_act_add_forward`` of the ``torch`` backend: ``F.batch_norm``, the activation, then
    the add, as PyTorch runs them eagerly, with the op's statistics (the batch mean and biased
    variance in training, copies of the running ones in eval)."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    out = apply_activation(y, activation) + residual
    if training:
        var, mean = torch.var_mean(x.detach().to(param_dtype_of(x)), dim=(0, 2, 3), correction=0)
    else:
        assert running_mean is not None and running_var is not None  # check_args: eval needs them
        mean, var = running_mean.clone(), running_var.clone()
    return out, mean, var


# ---------------------------------------------------------------------------------------------
# Fake kernel and autograd, shared by both families


def _forward_fake(
    x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation
):
    check_activation(activation, "bn_act_add_forward")
    channels = x.shape[1]
    return (
        torch.empty_like(x, memory_format=memory_format_of(x)),
        x.new_empty((channels,), dtype=param_dtype_of(x)),
        x.new_empty((channels,), dtype=param_dtype_of(x)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, _residual, _rm, _rv, training, _momentum, eps, activation = inputs
    _out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.activation = training, eps, activation


def _make_backward(family_suffix: str):
    forward_op = getattr(torch.ops.fastres, "bn_act_forward" + family_suffix)
    backward_op = getattr(torch.ops.fastres, "bn_act_backward" + family_suffix)

    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        activation, eps = ctx.activation, ctx.eps
        grad_y, mask = grad_through_activation(
            forward_op, grad_out, x, weight, bias, mean, var, eps, activation
        )
        grad_x, grad_weight, grad_bias, _ = backward_op(
            grad_y, x, weight, mean, var, mask, ctx.training, eps, activation == "relu", False
        )
        return (
            grad_x if needs[0] else None,
            grad_weight if weight is not None and needs[1] else None,
            grad_bias if bias is not None and needs[2] else None,
            grad_out if needs[3] else None,
        ) + (None,) * 6

    return backward


def _register(library, family_suffix: str) -> None:
    forward_op = getattr(torch.ops.fastres, "bn_act_add_forward" + family_suffix).default
    torch.library.register_fake(forward_op, _forward_fake)
    register_mutating_autograd(library, forward_op, _make_backward(family_suffix), _setup_context)


# ---------------------------------------------------------------------------------------------
# The Triton op family

_LIBRARY = torch.library.Library("fastres", "FRAGMENT")
_LIBRARY.define(
    "bn_act_add_forward_triton(Tensor x, Tensor? weight, Tensor? bias, Tensor residual, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
    "float eps, str activation) -> (Tensor, Tensor, Tensor)"
)


def bn_act_add_forward_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of ``fastres::bn_act_add_forward`` (same arguments, results and
    running-statistics update)."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    check_activation(activation, "bn_act_add_forward_triton")
    with launch_device(x):
        stats = (running_mean, running_var, training, eps, activation)
        out, mean, var, _ = kernels.bn_act_forward(
            x, weight, bias, residual, *stats, residual_after_activation=True
        )
    if training:
        update_running_stats(running_mean, running_var, mean, var, momentum, values_per_channel(x))
    return out, mean, var


for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("bn_act_add_forward_triton", bn_act_add_forward_triton, _key)

_register(_LIBRARY, "_triton")
if STATUS["cpu"].built:  # the compiled family exists once fastres._C is loaded
    # Kept: a Library's registrations last as long as the object.
    _COMPILED_LIBRARY = torch.library.Library("fastres", "IMPL")
    _register(_COMPILED_LIBRARY, "")
