"""BatchNorm's semantics beside the fused ops, in one place.

The fused ops compute batch statistics and normalise; what ``nn.BatchNorm2d.forward`` and
``F.batch_norm`` do around that lives here, and every op and plan uses it:

* which statistics a forward uses, and the running-statistics factor (``momentum``, or the
  cumulative average ``1 / num_batches_tracked`` for ``momentum=None``): :class:`BatchNormStep`;
* the ``num_batches_tracked`` step, taken where ``nn.BatchNorm2d`` takes it: :meth:`BatchNormStep.
  start`, never on reading a module;
* the running-statistics update with the unbiased batch variance, skipped for an empty batch:
  :func:`update_running_stats`;
* PyTorch's "more than 1 value per channel" error: :func:`require_more_than_one_value`;
* the dtypes the fused ops keep BatchNorm's tensors in: :func:`require_fused_dtypes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "BatchNormStep",
    "require_fused_dtypes",
    "require_more_than_one_value",
    "update_running_stats",
    "values_per_channel",
]


def values_per_channel(x: Tensor) -> int:
    """How many values of each channel an ``(N, C, H, W)`` batch holds: ``N * H * W``."""
    return x.shape[0] * x.shape[2] * x.shape[3]


def require_more_than_one_value(size: torch.Size, in_all: int | None = None) -> None:
    """Raises PyTorch's own ValueError (``F.batch_norm`` in training) when a channel has one
    value: for this batch of ``size``, or ``in_all`` values over every process of a
    synchronized BatchNorm (then one or none in all is an error)."""
    if in_all is None:
        count = size[0] * size[2] * size[3]
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
    elif in_all <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size} on "
            f"this process and {in_all} value(s) per channel in all processes"
        )


def require_fused_dtypes(block: nn.Module, norms: Sequence[nn.Module], x: Tensor) -> None:
    """Raises TypeError, naming the block, the BatchNorm and what to do, when a BatchNorm of
    ``block`` keeps its parameters or statistics in a dtype the fused ops do not take for ``x``:
    float32 for float32, float16 and bfloat16 activations (as ``torch.autocast`` leaves
    BatchNorm), float64 for float64. A model cast with ``.half()`` or ``.to(torch.bfloat16)``
    has them in that dtype."""
    expected = torch.float64 if x.dtype == torch.float64 else torch.float32
    names = {module: name for name, module in block.named_modules()}
    for bn in norms:
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        found = next((t.dtype for t in tensors if t is not None and t.dtype != expected), None)
        if found is None:
            continue
        if x.device.type == "cpu" and x.dtype == torch.float16:
            advice = (
                "on CPU, reduced precision is bfloat16 (float16 has no fast CPU kernels): keep "
                "the model in float32 and run it under torch.autocast('cpu', "
                "dtype=torch.bfloat16)"
            )
        else:
            advice = (
                f"keep the model in {expected} and run it under "
                f"torch.autocast({x.device.type!r}, dtype={x.dtype})"
            )
        raise TypeError(
            f"{type(block).__name__}: BatchNorm {names.get(bn, '?')!r} holds {found} tensors, "
            f"but fastres's fused ops keep BatchNorm's parameters and statistics in {expected} "
            f"for {x.dtype} activations; {advice}, or call fastres.revert(model) to run the "
            "library's own blocks"
        )


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    count: int,
) -> None:
    """In place, as ``F.batch_norm`` does in training: ``running = (1 - momentum) * running +
    momentum * batch``, with the unbiased batch variance (``var`` is the biased one over
    ``count`` values). Nothing to do without running statistics or for an empty batch.

    One foreach lerp for both buffers: this runs once per BatchNorm per step, and five separate
    tensor ops cost twice as long.
    """
    if running_mean is None or running_var is None or count == 0:
        return
    unbiased = var * (count / (count - 1)) if count > 1 else var
    with torch.no_grad():
        torch._foreach_lerp_([running_mean, running_var], [mean, unbiased], momentum)


@dataclass(frozen=True)
class BatchNormStep:
    """One forward of a BatchNorm module, with the arguments ``nn.BatchNorm2d.forward`` would
    give ``F.batch_norm``: batch statistics or running ones, and which running statistics to
    read or update. Building one reads the module and changes nothing.

    Attributes:
        module: the ``nn.BatchNorm2d`` (or subclass) it describes.
        training: normalise with batch statistics (training, or no running statistics at all).
        running_mean, running_var: ``(C,)`` buffers to update (training) or normalise with
            (eval), or None (``track_running_stats=False`` in training).
        weight, bias: the affine parameters, or None; eps as the module's.
    """

    module: nn.BatchNorm2d
    training: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, bn: nn.Module) -> BatchNormStep:
        """The step ``bn`` (an ``nn.BatchNorm2d``, or a subclass) takes next."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"BatchNormStep.of: bn must be an nn.BatchNorm2d, got {type(bn)}")
        keep_running = not bn.training or bn.track_running_stats
        return cls(
            module=bn,
            training=bn.training or (bn.running_mean is None and bn.running_var is None),
            running_mean=bn.running_mean if keep_running else None,
            running_var=bn.running_var if keep_running else None,
            weight=bn.weight,
            bias=bn.bias,
            eps=bn.eps,
        )

    def start(self) -> float:
        """Takes the step as ``nn.BatchNorm2d.forward`` does at its start (in training with
        tracked statistics, ``num_batches_tracked += 1``) and returns this step's
        running-statistics factor: ``momentum``, or ``1 / num_batches_tracked`` for
        ``momentum=None`` (a cumulative moving average)."""
        bn = self.module
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                return 1.0 / float(bn.num_batches_tracked)
        return 0.0 if bn.momentum is None else bn.momentum

    def running_statistics(self) -> tuple[Tensor, Tensor]:
        """(running_mean, running_var) of an eval step, which always has them."""
        if self.running_mean is None or self.running_var is None:
            raise ValueError("a BatchNorm normalising with running statistics has none")
        return self.running_mean, self.running_var

    def update(self, mean: Tensor, var: Tensor, momentum: float, count: int) -> None:
        """After a training forward: this BatchNorm's running statistics from the batch's
        ``mean`` and biased ``var`` over ``count`` values per channel."""
        if self.training:
            update_running_stats(self.running_mean, self.running_var, mean, var, momentum, count)
