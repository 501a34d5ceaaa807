"""fastres: fused conv / BatchNorm / ReLU / residual-add kernels for residual networks.

* :class:`FastBottleneck`, :class:`FastBasicBlock`: torchvision's blocks on fused ops;
* :class:`FastResNet`: torchvision's ResNet with its stem folded in eval (what the builders
  return);
* :class:`SyncBatchNorm2d`: BatchNorm with statistics over every process (CPU and CUDA);
* :func:`resnet50` (and the other ResNet builders), :func:`convert`, :func:`revert`,
  :func:`conversion_report` (what a conversion replaced and left alone, and why);
* :func:`explain`: per fast module, what runs for an input, why the other plans do not, and
  which ops it launches;
* :func:`fold_bn`: a convolution's weight and bias with an eval-mode BatchNorm folded in;
* :mod:`fastres.ops`: the fused ops (``bn_act``, ``bn_act_conv2d``, ``sync_bn_act``,
  ``sync_bn_act_conv2d``);
* :class:`BlockInputError`: a fast block's input has the wrong shape (a RuntimeError and a
  ValueError);
* :func:`info`: which kernel backends were built and which can run here.
"""

from fastres import backends as _backends  # noqa: F401  (loads fastres._C: torch.ops.fastres.*)
from fastres import ops
from fastres.adapters.torchvision import FastBasicBlock, FastBottleneck, FastResNet
from fastres.builders import (
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from fastres.conversion import ConversionReport, conversion_report, convert, revert
from fastres.explain import Explanation, explain
from fastres.fast_block import BlockInputError, FastBlockMixin, FastStemMixin
from fastres.folding import fold_bn
from fastres.sync_batch_norm import SyncBatchNorm2d


def info() -> dict:
    """What was built, what can run here, and why anything is missing (see fastres._info)."""
    from fastres._info import info as _info

    return _info()


__all__ = [
    "BlockInputError",
    "FastBasicBlock",
    "FastBlockMixin",
    "FastBottleneck",
    "FastResNet",
    "FastStemMixin",
    "SyncBatchNorm2d",
    "ConversionReport",
    "Explanation",
    "conversion_report",
    "convert",
    "explain",
    "revert",
    "fold_bn",
    "info",
    "ops",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
__version__ = "0.1.0"
