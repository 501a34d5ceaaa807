"""Drop-in residual blocks: torchvision's ``Bottleneck`` and ``BasicBlock`` on fused ops.

``FastBottleneck`` and ``FastBasicBlock`` subclass torchvision's blocks and keep their
constructor and attributes (``conv1 bn1 conv2 bn2 conv3 bn3 relu downsample stride``), so state
dicts are interchangeable and ``ResNet(zero_init_residual=True)`` keeps working.

Training forward of a bottleneck::

    y1 = conv1(x)
    y2 = bn_act_conv2d(y1; bn1, conv2)     # relu(bn1(y1)) is never kept for backward
    y3 = bn_act_conv2d(y2; bn2, conv3)
    out = bn_act(y3; bn3, residual=downsample(x) or x)

so autograd keeps y1, y2, y3 and 1-bit ReLU masks where torchvision also keeps both ReLU outputs.
Eval without autograd runs each convolution once with its BatchNorm folded in and bias, residual
add and ReLU fused (fastres/folding.py; oneDNN on cpu, cuDNN on cuda, the Triton epilogue on
triton); otherwise eval runs the same fused ops as training, with the running statistics.
``FastResNet`` (what the builders return) folds the stem's convolution the same way.

With ``sync_bn=True`` (or after ``fastres.convert(model, sync_bn=True)``) every BatchNorm of a
block is a :class:`SyncBatchNorm2d`: in training the fused ops compute batch statistics over every
process of its ``process_group`` (fastres/ops/sync_bn_act.py), on CPU (gloo) as on CUDA (NCCL).

A block whose layers the fused ops cannot reproduce (a norm layer other than an exact
``nn.BatchNorm2d`` or :class:`SyncBatchNorm2d`: FrozenBatchNorm2d, GroupNorm,
``nn.SyncBatchNorm``, ...; an activation other than
``nn.ReLU``; a convolution with a bias or non-zero padding mode), or whose backend resolves to
``torch``, runs torchvision's own forward: the reference computation, never a wrong one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastres._layout import memory_format_of
from fastres.backends import BACKEND_CHOICES, resolve_backend
from fastres.folding import FoldedBlock, folding_kind
from fastres.ops.bn_act import bn_act, update_running_stats
from fastres.ops.bn_act_conv import bn_act_conv2d
from fastres.ops.conv_bn import conv2d_bn_triton
from fastres.ops.sync_bn_act import bn_act_from_stats, sync_bn_act, sync_bn_act_conv2d

__all__ = ["FastBottleneck", "FastBasicBlock", "FastResNet", "SyncBatchNorm2d", "sync_batch_norms"]


def _check_backend_name(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def _check_block_input(x: Tensor, conv: nn.Conv2d, block: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{block}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{block}: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D with "
            f"shape {tuple(x.shape)}"
        )
    if x.shape[1] != conv.in_channels:
        raise ValueError(
            f"{block}: x must have {conv.in_channels} channels (the block's "
            f"inplanes), got {x.shape[1]}"
        )


def _fusable_batch_norm(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, SyncBatchNorm2d)


def _synchronised(bn: nn.Module) -> bool:
    """Whether bn's statistics come from every process of its group (training only, as in
    nn.SyncBatchNorm: eval and running statistics need no communication)."""
    return isinstance(bn, SyncBatchNorm2d) and bn.training


def _fusable_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.bias is None
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class _BatchNormCall:
    """The arguments nn.BatchNorm2d.forward would pass to F.batch_norm, worked out the same way.

    Building one in training bumps ``num_batches_tracked``, exactly when nn.BatchNorm2d does.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            # momentum=None: a cumulative moving average.
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        self.training = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep_stats = not bn.training or bn.track_running_stats
        self.running_mean = bn.running_mean if keep_stats else None
        self.running_var = bn.running_var if keep_stats else None
        self.momentum = factor
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _bn_relu_conv(y: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, backend: str) -> Tensor:
    """conv(relu(bn(y))) through bn_act_conv2d, updating bn's running statistics as bn would."""
    call = _BatchNormCall(bn)
    weight = conv.weight
    compute_dtype = _autocast_dtype(y)
    if compute_dtype is not None:
        # The fused op is opaque to autocast: cast as autocast would for the convolution.
        y, weight = y.to(compute_dtype), weight.to(compute_dtype)
    with torch.autocast(y.device.type, enabled=False):
        if _synchronised(bn):
            return sync_bn_act_conv2d(
                y,
                call.weight,
                call.bias,
                call.running_mean,
                call.running_var,
                weight,
                list(conv.stride),
                list(conv.padding),
                list(conv.dilation),
                conv.groups,
                training=call.training,
                momentum=call.momentum,
                eps=call.eps,
                process_group=bn.process_group,
                backend=backend,
            )
        out, mean, var = bn_act_conv2d(
            y,
            call.weight,
            call.bias,
            call.running_mean,
            call.running_var,
            weight,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            conv.groups,
            call.training,
            call.eps,
            backend,
        )
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if call.training and call.running_mean is not None and count > 0:
        update_running_stats(call.running_mean, call.running_var, mean, var, call.momentum, count)
    return out


def _bn_add_relu(y: Tensor, bn: nn.BatchNorm2d, residual: Tensor, backend: str) -> Tensor:
    """relu(bn(y) + residual) through bn_act."""
    call = _BatchNormCall(bn)
    if residual.dtype != y.dtype:  # autocast: the residual path may be in another precision
        residual = residual.to(y.dtype)
    if _synchronised(bn):
        return sync_bn_act(
            y,
            call.weight,
            call.bias,
            call.running_mean,
            call.running_var,
            residual=residual,
            training=call.training,
            momentum=call.momentum,
            eps=call.eps,
            relu=True,
            process_group=bn.process_group,
            backend=backend,
        )
    return bn_act(
        y,
        call.weight,
        call.bias,
        call.running_mean,
        call.running_var,
        residual=residual,
        training=call.training,
        momentum=call.momentum,
        eps=call.eps,
        relu=True,
        backend=backend,
    )


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
        self.backend = _check_backend_name(backend)

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
        sync.backend = _check_backend_name(backend)
        return sync

    def to_batch_norm(self) -> nn.BatchNorm2d:
        """The inverse of :meth:`from_batch_norm`: an ``nn.BatchNorm2d`` on the same tensors."""
        plain = retyped(self, nn.BatchNorm2d)
        del plain.__dict__["process_group"], plain.__dict__["backend"]
        return plain

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        call = _BatchNormCall(self)
        if self.training:
            return sync_bn_act(
                x,
                call.weight,
                call.bias,
                call.running_mean,
                call.running_var,
                training=call.training,
                momentum=call.momentum,
                eps=call.eps,
                relu=False,
                process_group=self.process_group,
                backend=self.backend,
            )
        return bn_act(
            x,
            call.weight,
            call.bias,
            call.running_mean,
            call.running_var,
            training=call.training,
            momentum=call.momentum,
            eps=call.eps,
            relu=False,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


def retyped(module: nn.Module, cls: type) -> nn.Module:
    """The same module state under another class: every parameter, buffer, submodule, hook and
    the training flag are the very same objects, so nothing is copied or cast."""
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    return new


def replace_modules(
    root: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]
) -> list[str]:
    """Replaces, in place, every module of exactly type ``kind`` under ``root`` (not ``root``
    itself) by ``make(module)``; returns their qualified names."""
    targets = [
        (f"{parent_name}.{name}" if parent_name else name, parent, name, child)
        for parent_name, parent in root.named_modules()
        for name, child in parent.named_children()
        if type(child) is kind
    ]
    for _, parent, name, child in targets:
        setattr(parent, name, make(child))
    return [qualified for qualified, *_ in targets]


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


class _FastBlock:
    """The forward both fast blocks share. ``_norms`` and ``_convs`` name the block's layers in
    order; every BatchNorm but the last feeds the next convolution, the last meets the residual."""

    _norms: tuple[str, ...]
    _convs: tuple[str, ...]

    def _configure(self, backend: str, sync_bn: bool, process_group: Any | None) -> None:
        """The fast blocks' own constructor options (after torchvision's constructor)."""
        self.backend = _check_backend_name(backend)
        if sync_bn:
            sync_batch_norms(self, process_group, backend)

    def fused(self) -> bool:
        """Whether forward can use the fused ops (else it runs torchvision's forward)."""
        return (
            all(_fusable_batch_norm(getattr(self, name)) for name in self._norms)
            and all(_fusable_conv(getattr(self, name)) for name in self._convs)
            and type(self.relu) is nn.ReLU
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_block_input(x, self.conv1, type(self).__name__)
        backend = resolve_backend(self.backend, x.device, x.dtype)
        if backend == "torch" or not self.fused():
            return super().forward(x)
        if self._can_fold(x, backend):
            return self._folded_forward(x, backend)
        if backend == "triton" and self._triton_convolutions_apply(x):
            return self._triton_forward(x)
        norms = [getattr(self, name) for name in self._norms]
        convs = [getattr(self, name) for name in self._convs]
        out = convs[0](x)
        for bn, conv in zip(norms[:-1], convs[1:], strict=True):
            out = _bn_relu_conv(out, bn, conv, backend)
        # After the main branch, as in torchvision: an error there leaves the downsample
        # branch's BatchNorm untouched.
        identity = x if self.downsample is None else self.downsample(x)
        return _bn_add_relu(out, norms[-1], identity, backend)

    # --- triton: Triton convolutions with the BatchNorms in their prologues and epilogues -----

    def _triton_convolutions_apply(self, x: Tensor) -> bool:
        """The Triton convolutions take every block of ResNet-50 and ResNeXt: square kernels,
        the same stride, padding and dilation along H and W; float32/16/bf16 activations.
        Synchronized BatchNorm keeps the bn_act path (its statistics need a collective)."""
        convs = [getattr(self, name) for name in self._convs]
        return (
            x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and all(type(getattr(self, name)) is nn.BatchNorm2d for name in self._norms)
            and all(
                len(set(c.kernel_size)) == 1
                and len(set(c.stride)) == 1
                and len(set(c.padding)) == 1
                and len(set(c.dilation)) == 1
                for c in convs
            )
        )

    def _triton_forward(self, x: Tensor) -> Tensor:
        """conv1(+stats) -> [BN1+ReLU]conv2(+stats) -> ... -> BN_last + residual + ReLU: each
        BatchNorm but the last is applied in the next convolution's prologue, each batch
        statistic comes from the previous convolution's epilogue (fastres/ops/conv_bn.py).
        Computed channels_last; the result has x's memory format."""
        compute_dtype = _autocast_dtype(x) or x.dtype
        out_format = memory_format_of(x)
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(compute_dtype)
            before = None  # (call, mean, var) of the BatchNorm waiting to be applied to h
            for conv_name, bn_name in zip(self._convs, self._norms, strict=True):
                conv, call = getattr(self, conv_name), _BatchNormCall(getattr(self, bn_name))
                bn_args = (
                    (
                        before[1],
                        before[2],
                        before[0].weight,
                        before[0].bias,
                        before[0].training,
                        before[0].eps,
                    )
                    if before
                    else (None, None, None, None, False, call.eps)
                )
                h, mean, var = conv2d_bn_triton(
                    h,
                    conv.weight.to(compute_dtype),
                    *bn_args,
                    conv.stride[0],
                    conv.padding[0],
                    conv.dilation[0],
                    conv.groups,
                    call.training,
                )
                if call.training:
                    count = h.shape[0] * h.shape[2] * h.shape[3]
                    if count == 1:  # where, and as, torchvision's block would raise
                        raise ValueError(
                            "Expected more than 1 value per channel when "
                            f"training, got input size {h.size()}"
                        )
                    if call.running_mean is not None and count > 0:
                        update_running_stats(
                            call.running_mean, call.running_var, mean, var, call.momentum, count
                        )
                    before = (call, mean, var)
                else:
                    before = (call, call.running_mean, call.running_var)
        # After the main branch, as in torchvision (an error there leaves the downsample
        # branch's BatchNorm untouched), and under the caller's autocast.
        identity = x if self.downsample is None else self.downsample(x)
        with torch.autocast(x.device.type, enabled=False):
            call, mean, var = before
            residual = identity.to(h.dtype)
            if call.training:
                out = bn_act_from_stats(
                    h,
                    call.weight,
                    call.bias,
                    mean,
                    var,
                    residual=residual,
                    eps=call.eps,
                    relu=True,
                    backend="triton",
                )
            else:
                out = bn_act(
                    h,
                    call.weight,
                    call.bias,
                    mean,
                    var,
                    residual=residual,
                    training=False,
                    eps=call.eps,
                    relu=True,
                    backend="triton",
                )
        return out.contiguous(memory_format=out_format)

    # --- eval with BatchNorm folded into the convolutions (fastres/folding.py) ----------------

    def _downsample_pair(self):
        """(conv, bn) of a foldable downsample branch, else None."""
        ds = self.downsample
        if (
            type(ds) is nn.Sequential
            and len(ds) == 2
            and _fusable_conv(ds[0])
            and _fusable_batch_norm(ds[1])
        ):
            return ds[0], ds[1]
        return None

    def _can_fold(self, x: Tensor, backend: str) -> bool:
        norms = [getattr(self, name) for name in self._norms]
        if self.downsample is not None and self._downsample_pair() is not None:
            norms.append(self.downsample[1])
        return not self.training and _foldable(x, backend, [self], norms)

    def _folded_forward(self, x: Tensor, backend: str) -> Tensor:
        pairs = [
            (getattr(self, c), getattr(self, n))
            for c, n in zip(self._convs, self._norms, strict=True)
        ]
        cache = _FOLDED.setdefault(self, FoldedBlock())
        stages, downsample = cache.stages(pairs, self._downsample_pair(), folding_kind(backend))
        # A downsample branch that is not (conv, BatchNorm) runs as itself, under autocast.
        unfolded_identity = (
            self.downsample(x) if downsample is None and self.downsample is not None else None
        )
        with torch.autocast(x.device.type, enabled=False):
            h = _folding_input(x, backend)
            out = h
            for stage in stages[:-1]:
                out = stage.run(out, relu=True)
            if downsample is not None:
                identity = downsample.run(h, relu=False)
            else:
                identity = h if unfolded_identity is None else unfolded_identity
            identity = identity.to(h.dtype).contiguous(memory_format=memory_format_of(out))
            out = stages[-1].run(out, relu=True, residual=identity)
        return out.contiguous(memory_format=memory_format_of(x))

    def train(self, mode: bool = True):
        _FOLDED.pop(self, None)  # folded weights are for eval only; free them
        return super().train(mode)


def _foldable(
    x: Tensor, backend: str, layers: list[nn.Module], norms: list[nn.BatchNorm2d]
) -> bool:
    """Whether eval of ``layers`` (in eval mode) may run with their BatchNorms ``norms`` folded:
    where that gives exactly the eval computation and nothing needs gradients. Every BatchNorm
    in eval with running statistics; on cpu in float32 without autocast (oneDNN), on cuda and
    triton in float32, float16 or bfloat16, autocast included. Anything else (autograd in eval,
    torch.compile tracing, ...) takes the unfused eval path, which keeps gradients."""
    if torch.compiler.is_compiling() or folding_kind(backend) is None:
        return False
    if backend == "cpu":
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return False
    elif (_autocast_dtype(x) or x.dtype) not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for layer in layers for p in layer.parameters())
    ):
        return False
    return all(not bn.training and bn.running_mean is not None for bn in norms)


def _folding_input(x: Tensor, backend: str) -> Tensor:
    """x as folded convolutions take it: in the autocast dtype if any, and channels_last for
    cuDNN's and Triton's fused convolutions."""
    h = x.to(_autocast_dtype(x) or x.dtype)
    return h if backend == "cpu" else h.contiguous(memory_format=torch.channels_last)


# Folded weights of each block (and ResNet stem), kept beside the module (not in it: they are
# neither state to save nor something deepcopy should duplicate).
_FOLDED: weakref.WeakKeyDictionary[nn.Module, FoldedBlock] = weakref.WeakKeyDictionary()


class FastBottleneck(_FastBlock, Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused ops.

    Same constructor as torchvision's, plus ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"torch"``) and ``sync_bn`` / ``process_group``: with ``sync_bn=True`` every
    BatchNorm of the block, the downsample branch's included, becomes a :class:`SyncBatchNorm2d`
    over ``process_group`` (None: the default group). Input ``(N, inplanes, H, W)``; output
    ``(N, planes * 4, H / stride, W / stride)``, dtype and memory format as torchvision's.
    """

    _norms = ("bn1", "bn2", "bn3")
    _convs = ("conv1", "conv2", "conv3")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str = "auto",
        sync_bn: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer
        )
        self._configure(backend, sync_bn, process_group)


class FastBasicBlock(_FastBlock, BasicBlock):
    """torchvision's ``BasicBlock`` on fused ops; see :class:`FastBottleneck`.

    Input ``(N, inplanes, H, W)``; output ``(N, planes, H / stride, W / stride)``.
    """

    _norms = ("bn1", "bn2")
    _convs = ("conv1", "conv2")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str = "auto",
        sync_bn: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer
        )
        self._configure(backend, sync_bn, process_group)


class FastResNet(ResNet):
    """torchvision's ``ResNet`` whose stem runs like the fast blocks in eval:
    ``relu(bn1(conv1(x)))`` as one convolution with bn1 folded in and the ReLU fused
    (fastres/folding.py), so that every convolution of the model is folded. Everything else
    (training, attributes, state dict, the blocks, pooling, fc) is ResNet's.
    :func:`fastres.resnet50` and the other builders return one; :func:`fastres.convert` retypes
    an exact ``ResNet`` into one on the same tensors and :func:`fastres.revert` back.
    """

    backend: str

    def _forward_impl(self, x: Tensor) -> Tensor:
        backend = self._stem_folding_backend(x)
        if backend is None:
            return super()._forward_impl(x)
        x = self.maxpool(self._folded_stem(x, backend))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _stem_folding_backend(self, x: Tensor) -> str | None:
        """The backend the stem runs folded on, or None to run ResNet's own forward: for a
        (N, C, H, W) input the stem takes (anything else gets ResNet's own errors), the usual
        stem layers, in eval, where :func:`_foldable` allows."""
        if not (
            isinstance(x, Tensor)
            and x.dim() == 4
            and x.shape[1] == self.conv1.in_channels
            and _fusable_conv(self.conv1)
            and _fusable_batch_norm(self.bn1)
            and type(self.relu) is nn.ReLU
            and not self.training
        ):
            return None
        backend = resolve_backend(self.backend, x.device, x.dtype)
        if backend == "torch" or not _foldable(x, backend, [self.conv1, self.bn1], [self.bn1]):
            return None
        return backend

    def _folded_stem(self, x: Tensor, backend: str) -> Tensor:
        cache = _FOLDED.setdefault(self, FoldedBlock())
        (stage,), _ = cache.stages([(self.conv1, self.bn1)], None, folding_kind(backend))
        with torch.autocast(x.device.type, enabled=False):
            out = stage.run(_folding_input(x, backend), relu=True)
        return out.contiguous(memory_format=memory_format_of(x))

    def train(self, mode: bool = True):
        _FOLDED.pop(self, None)  # folded weights are for eval only; free them
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
