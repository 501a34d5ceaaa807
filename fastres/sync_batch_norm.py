"""``SyncBatchNorm2d``: ``nn.BatchNorm2d`` whose training statistics cover every process of a
group, on the fused kernels (fastres/ops/sync_bn_act.py), and ``sync_batch_norms`` to retype a
model's BatchNorms into it."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from fastres.backends import check_backend_name
from fastres.batch_norm import BatchNormStep
from fastres.module_tree import replace_modules, retyped
from fastres.plans.fused_ops import bn_act_for

__all__ = ["SyncBatchNorm2d", "sync_batch_norms"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics cover every process of a group.

    What ``nn.SyncBatchNorm`` computes, on fastres's fused kernels, for CUDA tensors (NCCL) and
    CPU tensors (gloo; ``nn.SyncBatchNorm`` has no CPU path). Processes may hold different batch
    sizes, including zero. Parameters, buffers and state dicts are those of ``nn.BatchNorm2d``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as for
            ``nn.BatchNorm2d``.
        process_group: the ``torch.distributed`` group to synchronise over; None: the default
            group, looked up at each training forward.
        backend: the fused kernels' backend (see :mod:`fastres.backends`).

    Input ``(N, C, H, W)``; output of the same shape, dtype and memory format. In training, every
    process of the group must run the forward (and backward) in step; torch.distributed must be
    initialised, else a RuntimeError says so. Eval communicates nothing.
    """

    process_group: Any
    backend: str
    # What the plans (fastres/plans/) recognise a synchronised BatchNorm by, without importing
    # this module layer: statistics over process_group in training.
    synchronises_statistics: ClassVar[bool] = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.backend = check_backend_name(backend)

    @classmethod
    def from_batch_norm(
        cls, bn: nn.BatchNorm2d, process_group: Any | None = None, backend: str = "auto"
    ) -> SyncBatchNorm2d:
        """``bn`` itself, retyped: the very same parameters, buffers, hooks and mode."""
        if type(bn) is not nn.BatchNorm2d:
            raise TypeError(
                f"SyncBatchNorm2d.from_batch_norm: bn must be an nn.BatchNorm2d, got "
                f"{type(bn).__name__}"
            )
        sync = retyped(bn, cls)
        sync.process_group = process_group
        sync.backend = check_backend_name(backend)
        return sync

    def to_batch_norm(self) -> nn.BatchNorm2d:
        """The inverse of :meth:`from_batch_norm`: an ``nn.BatchNorm2d`` on the same tensors."""
        plain = retyped(self, nn.BatchNorm2d)
        del plain.__dict__["process_group"], plain.__dict__["backend"]
        return plain

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        step = BatchNormStep.of(self)
        args = (x, step.weight, step.bias, step.running_mean, step.running_var)
        return bn_act_for(self)(
            *args,
            training=step.training,
            momentum=step.start(),
            eps=step.eps,
            activation="identity",
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


def sync_batch_norms(
    module: nn.Module, process_group: Any | None = None, backend: str = "auto"
) -> list[str]:
    """Retypes, in place, every exact ``nn.BatchNorm2d`` under ``module`` (not ``module``
    itself) into a :class:`SyncBatchNorm2d` on the same tensors; returns their qualified names."""
    return replace_modules(
        module,
        nn.BatchNorm2d,
        lambda bn: SyncBatchNorm2d.from_batch_norm(bn, process_group, backend),
    )
