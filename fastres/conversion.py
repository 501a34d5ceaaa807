"""``convert()`` / ``revert()``: fast blocks swapped into models you already have, and back, with
the report of what was replaced and what was left alone (``conversion_report``)."""

from __future__ import annotations

import copy
import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchvision.models.resnet import ResNet

from fastres.adapters import LibraryAdapter, adapters
from fastres.adapters import torchvision as torchvision_adapter
from fastres.backends import check_backend_name
from fastres.fast_block import FastStemMixin
from fastres.module_tree import replace_modules, retyped
from fastres.sync_batch_norm import SyncBatchNorm2d, sync_batch_norms

__all__ = ["ConversionReport", "conversion_report", "convert", "revert", "swap_blocks"]

logger = logging.getLogger("fastres")

# torchvision's classes and their fast ones: a subclass of one is reported as left alone.
_FAST_OF = torchvision_adapter.ADAPTER.fast_classes


@dataclass
class ConversionReport:
    """What :func:`convert` or :func:`revert` replaced, and what it left alone and why."""

    converted: list[str] = field(default_factory=list)  # qualified names of the blocks
    resnets: list[str] = field(default_factory=list)  # ResNets made FastResNet (or back)
    stems: list[str] = field(default_factory=list)  # other libraries' stems (FastStemMixin)
    left_alone: dict[str, str] = field(default_factory=dict)  # name -> reason
    # BatchNorms made SyncBatchNorm2d (convert with sync_bn=True) or made plain again (revert)
    batch_norms: list[str] = field(default_factory=list)

    def summary(self, verb: str = "converted") -> str:
        text = f"fastres: {verb} {len(self.converted)} block(s)"
        if self.resnets:
            text += f", {len(self.resnets)} ResNet stem(s)"
        if self.stems:
            text += f", {len(self.stems)} stem(s)"
        if self.batch_norms:
            text += f" and {len(self.batch_norms)} BatchNorm layer(s)"
        if self.left_alone:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.left_alone.items())
            text += f"; left {len(self.left_alone)} alone ({reasons})"
        return text


# The last convert() or revert() report of each model it returned (beside the model: not state
# to save or deepcopy).
_REPORTS: weakref.WeakKeyDictionary[nn.Module, ConversionReport] = weakref.WeakKeyDictionary()


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report of the last :func:`convert` or :func:`revert` that returned ``model``: the
    qualified names of what was replaced, and what was left alone with the reason.

    Raises:
        LookupError: ``model`` was not returned by convert() or revert() (a copy of a converted
            model has no report of its own).
    """
    try:
        return _REPORTS[model]
    except KeyError:
        raise LookupError(
            f"conversion_report: this {type(model).__name__} was not returned by "
            "fastres.convert() or fastres.revert()"
        ) from None


def swap_blocks(
    model: nn.Module,
    pick: Callable[[nn.Module, str], tuple[type | None, str]],
    configure: Callable[[nn.Module], None],
) -> tuple[nn.Module, ConversionReport]:
    """Walks ``model``: where ``pick(module, qualified_name)`` gives a class, the module is
    retyped into it (a ResNet in place, its children visited; a block or stem replaced, not
    descended into) and ``configure``d; where it gives none, its reason (if any) is reported as
    left alone. Returns the model and the report."""
    report = ConversionReport()

    def visit(module: nn.Module, name: str) -> nn.Module:
        cls, why_not = pick(module, name)
        if cls is not None and issubclass(cls, ResNet):
            # A whole model, maybe the one the caller holds (convert(inplace=True) returns the
            # caller's object): its class changes in place; its blocks are visited below.
            module.__class__ = cls
            configure(module)
            report.resnets.append(name or "<model>")
        elif cls is not None:
            block: nn.Module = retyped(module, cls)
            configure(block)
            stem = isinstance(block, FastStemMixin) or isinstance(module, FastStemMixin)
            (report.stems if stem else report.converted).append(name or "<model>")
            return block
        elif why_not:
            report.left_alone[name or "<model>"] = why_not
        for child_name, child in module.named_children():
            replacement = visit(child, f"{name}.{child_name}" if name else child_name)
            if replacement is not child:
                setattr(module, child_name, replacement)
        return module

    return visit(model, ""), report


def convert(
    model: nn.Module,
    *,
    backend: str = "auto",
    inplace: bool = False,
    sync_bn: bool = False,
    process_group: Any | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replaces every residual block of ``model`` that fastres knows by a fast block.

    The blocks: torchvision's ``Bottleneck`` and ``BasicBlock``, anywhere in a model (plain
    ResNets, ResNeXt, Wide ResNet, backbones nested in other models); timm's ResNet
    ``Bottleneck`` and ``BasicBlock``, Hugging Face transformers' ``ResNetBottleNeckLayer`` and
    ``ResNetBasicLayer`` (and its stem, ``ResNetEmbeddings``), and Ultralytics' ``ResNetBlock``
    (and its stem ``ResNetLayer``), its YOLO detectors' ``Bottleneck`` and every other ``Conv``
    and ``DWConv``, when those libraries are installed (fastres/adapters/); the
    stems fold in eval like torchvision's. A block or stem with a layer the fused ops do not
    reproduce (timm's squeeze-excitation or anti-aliasing; the FrozenBatchNorm2d of
    torchvision's detection backbones; another activation or norm, in any library's blocks) is
    left alone, with the reason in the report that is logged. A torchvision ``ResNet`` itself
    becomes a :class:`fastres.FastResNet`, whose stem convolution is folded in eval like
    the blocks'. Every parameter and buffer is kept as the same tensor (bit for bit), with its
    device, dtype, memory format and requires_grad, and each module keeps its training mode. A
    subclass of torchvision's blocks or ResNet is left alone (its computation is not known to be
    the original's). The outcome is logged on the ``fastres`` logger, and a warning says so when
    nothing was converted; :func:`conversion_report` returns the report.

    Args:
        model: any module.
        backend: the fast blocks' backend (see :mod:`fastres.backends`).
        inplace: modify ``model`` itself; otherwise a deep copy is converted.
        sync_bn: also make every ``nn.BatchNorm2d`` of the model (in the blocks, their downsample
            branches, the stem and elsewhere) a :class:`fastres.SyncBatchNorm2d` on the same
            tensors, so that training computes batch statistics over every process of
            ``process_group``, as ``nn.SyncBatchNorm`` does, on CPU (gloo) and CUDA (NCCL).
            torch.distributed must be initialised by the first training forward, not before.
        process_group: the group for ``sync_bn`` (None: the default group).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, asked of each block, stem or
            ResNet that would be converted (its name as in ``model.named_modules()``, ``""``
            for ``model`` itself); False leaves it alone, reported as such, and its children are
            still visited (as torchao's ``quantize_`` does). None converts everything it can.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Example::

        # the backbone's last stage only; the rest keeps torchvision's blocks
        fast = fastres.convert(model, filter_fn=lambda module, name: name.startswith("layer4"))
        fastres.conversion_report(fast).converted  # ['layer4.0', 'layer4.1', 'layer4.2']
    """
    check_backend_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            "convert: filter_fn must be a callable (module, qualified_name) -> bool, got "
            f"{type(filter_fn).__name__}"
        )
    if not inplace:
        model = copy.deepcopy(model)

    library_adapters = adapters()
    # Asked before anything changes: a filter_fn that raises leaves the model as it was.
    kept = _filter_answers(model, filter_fn, library_adapters)

    def pick(module: nn.Module, name: str):
        for adapter in library_adapters:
            if type(module) in adapter.fast_classes:
                why_not = adapter.left_alone(module)
                if why_not is None:  # not a candidate (see LibraryAdapter.left_alone)
                    return None, ""
                if why_not:
                    return None, why_not
                if not kept.get(id(module), True):
                    return None, "filter_fn returned False"
                return adapter.fast_classes[type(module)], ""
        for plain, fast in _FAST_OF.items():
            if isinstance(module, plain) and not isinstance(module, fast):
                return None, f"{type(module).__name__} subclasses torchvision's {plain.__name__}"
        return None, ""

    def configure(block: nn.Module) -> None:
        # nn.Module's __setattr__ is typed for tensors and modules only.
        block.backend = backend  # type: ignore[assignment]

    model, report = swap_blocks(model, pick, configure)
    if sync_bn:
        report.batch_norms = sync_batch_norms(model, process_group, backend)
    elif process_group is not None:
        raise ValueError("convert: process_group is only used with sync_bn=True")
    _report(model, report, "converted")
    return model


def _filter_answers(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    library_adapters: list[LibraryAdapter],
) -> dict[int, bool]:
    """filter_fn's answer for each module of a class convert() retypes, by id."""
    if filter_fn is None:
        return {}
    classes = {cls for adapter in library_adapters for cls in adapter.fast_classes}
    answers = {}
    for name, module in model.named_modules():
        if type(module) in classes:
            keep = filter_fn(module, name)
            if not isinstance(keep, bool):
                raise TypeError(
                    f"convert: filter_fn must return a bool, got {type(keep).__name__} for "
                    f"{name or '<model>'!r}"
                )
            answers[id(module)] = keep
    return answers


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turns fast blocks back into torchvision's ``Bottleneck`` and ``BasicBlock``.

    The inverse of :func:`convert`: same tensors, same training modes; every
    :class:`fastres.SyncBatchNorm2d` becomes an ``nn.BatchNorm2d`` again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    originals: dict[type[nn.Module], type[nn.Module]] = {}
    for adapter in adapters():
        originals.update({fast: plain for plain, fast in adapter.fast_classes.items()})

    def pick(module: nn.Module, name: str):
        return originals.get(type(module)), ""

    def configure(block: nn.Module) -> None:
        del block.__dict__["backend"]

    model, report = swap_blocks(model, pick, configure)
    report.batch_norms = replace_modules(model, SyncBatchNorm2d, SyncBatchNorm2d.to_batch_norm)
    _report(model, report, "reverted")
    return model


def _report(model: nn.Module, report: ConversionReport, verb: str) -> None:
    _REPORTS[model] = report
    if report.converted:
        logger.info(report.summary(verb))
    else:
        warnings.warn(
            f"{report.summary(verb)}: the model has no block to {verb[:-2]} and is "
            "returned unchanged",
            UserWarning,
            stacklevel=3,
        )
