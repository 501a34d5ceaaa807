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
Eval on CPU in float32 without autograd runs each convolution once with its BatchNorm folded in
and bias, residual add and ReLU fused (fastres/folding.py); otherwise eval runs the same fused
ops as training, with the running statistics.

A block whose layers the fused ops cannot reproduce (a norm layer other than an exact
``nn.BatchNorm2d``: FrozenBatchNorm2d, GroupNorm, SyncBatchNorm, ...; an activation other than
``nn.ReLU``; a convolution with a bias or non-zero padding mode), or whose backend resolves to
``torch``, runs torchvision's own forward: the reference computation, never a wrong one.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastres.backends import BACKEND_CHOICES, resolve_backend
from fastres.folding import FoldedBlock, folding_available
from fastres.ops.bn_act import bn_act, update_running_stats
from fastres.ops.bn_act_conv import bn_act_conv2d

__all__ = ["FastBottleneck", "FastBasicBlock"]


def _check_backend_name(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def _check_block_input(x: Tensor, conv: nn.Conv2d, block: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{block}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{block}: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D with "
                         f"shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"{block}: x must have {conv.in_channels} channels (the block's "
                         f"inplanes), got {x.shape[1]}")


def _fusable_batch_norm(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d


def _fusable_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.bias is None and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


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


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
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
        out, mean, var = bn_act_conv2d(
            y, call.weight, call.bias, call.running_mean, call.running_var, weight,
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups,
            call.training, call.eps, backend)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if call.training and call.running_mean is not None and count > 0:
        update_running_stats(call.running_mean, call.running_var, mean, var, call.momentum, count)
    return out


def _bn_add_relu(y: Tensor, bn: nn.BatchNorm2d, residual: Tensor, backend: str) -> Tensor:
    """relu(bn(y) + residual) through bn_act."""
    call = _BatchNormCall(bn)
    if residual.dtype != y.dtype:  # autocast: the residual path may be in another precision
        residual = residual.to(y.dtype)
    return bn_act(y, call.weight, call.bias, call.running_mean, call.running_var,
                  residual=residual, training=call.training, momentum=call.momentum,
                  eps=call.eps, relu=True, backend=backend)


class _FastBlock:
    """The forward both fast blocks share. ``_norms`` and ``_convs`` name the block's layers in
    order; every BatchNorm but the last feeds the next convolution, the last meets the residual."""

    _norms: tuple[str, ...]
    _convs: tuple[str, ...]

    def fused(self) -> bool:
        """Whether forward can use the fused ops (else it runs torchvision's forward)."""
        return (all(_fusable_batch_norm(getattr(self, name)) for name in self._norms)
                and all(_fusable_conv(getattr(self, name)) for name in self._convs)
                and type(self.relu) is nn.ReLU)

    def forward(self, x: Tensor) -> Tensor:
        _check_block_input(x, self.conv1, type(self).__name__)
        backend = resolve_backend(self.backend, x.device)
        if backend == "torch" or not self.fused():
            return super().forward(x)
        if self._can_fold(x, backend):
            return self._folded_forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        norms = [getattr(self, name) for name in self._norms]
        convs = [getattr(self, name) for name in self._convs]
        out = convs[0](x)
        for bn, conv in zip(norms[:-1], convs[1:]):
            out = _bn_relu_conv(out, bn, conv, backend)
        return _bn_add_relu(out, norms[-1], identity, backend)


    # --- eval with BatchNorm folded into the convolutions (fastres/folding.py) ----------------

    def _downsample_pair(self):
        """(conv, bn) of a foldable downsample branch, else None."""
        ds = self.downsample
        if (type(ds) is nn.Sequential and len(ds) == 2 and _fusable_conv(ds[0])
                and _fusable_batch_norm(ds[1])):
            return ds[0], ds[1]
        return None

    def _can_fold(self, x: Tensor, backend: str) -> bool:
        """Folded inference runs where it gives exactly the eval computation and nothing needs
        gradients: CPU float32 without autocast, every BatchNorm in eval with running stats.
        Anything else (autograd in eval, autocast, torch.compile tracing) takes the unfused
        eval path, which keeps gradients."""
        if backend != "cpu" or self.training or x.dtype != torch.float32:
            return False
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.parameters())):
            return False
        norms = [getattr(self, name) for name in self._norms]
        if self.downsample is not None and self._downsample_pair() is not None:
            norms.append(self.downsample[1])
        return folding_available() and all(
            not bn.training and bn.running_mean is not None for bn in norms)

    def _folded_forward(self, x: Tensor) -> Tensor:
        pairs = [(getattr(self, c), getattr(self, n)) for c, n in zip(self._convs, self._norms)]
        cache = _FOLDED.setdefault(self, FoldedBlock())
        stages, downsample = cache.stages(pairs, self._downsample_pair())
        out = x
        for stage in stages[:-1]:
            out = stage.run(out, relu=True)
        if downsample is not None:
            identity = downsample.run(x, relu=False)
        else:
            identity = x if self.downsample is None else self.downsample(x)
        return stages[-1].run(out, relu=True, residual=identity)

    def train(self, mode: bool = True):
        _FOLDED.pop(self, None)  # folded weights are for eval only; free them
        return super().train(mode)


# Folded weights of each block, kept beside the module (not in it: they are neither state to
# save nor something deepcopy should duplicate).
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, FoldedBlock]" = weakref.WeakKeyDictionary()


class FastBottleneck(_FastBlock, Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused ops.

    Same constructor as torchvision's, plus ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"torch"``). Input ``(N, inplanes, H, W)``; output
    ``(N, planes * 4, H / stride, W / stride)``, dtype and memory format as torchvision's.
    """

    _norms = ("bn1", "bn2", "bn3")
    _convs = ("conv1", "conv2", "conv3")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None, *,
                 backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self.backend = _check_backend_name(backend)


class FastBasicBlock(_FastBlock, BasicBlock):
    """torchvision's ``BasicBlock`` on fused ops; see :class:`FastBottleneck`.

    Input ``(N, inplanes, H, W)``; output ``(N, planes, H / stride, W / stride)``.
    """

    _norms = ("bn1", "bn2")
    _convs = ("conv1", "conv2")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None, *,
                 backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self.backend = _check_backend_name(backend)
