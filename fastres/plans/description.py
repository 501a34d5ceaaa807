"""The canonical description of a residual block, which every execution plan works on.

Whatever library built it, a residual block computes::

    h   = x
    h   = activation_i(norm_i(conv_i(h)))        for each stage i of the main branch
    out = activation(h + shortcut(x))            shortcut: identity or its own modules

with the add in one of three places (:data:`ADD_POSITIONS`): before the block's activation, as
above (ResNet: the last stage has no activation of its own); after the last stage's activation,
``out = h + shortcut(x)`` (Ultralytics' YOLO Bottleneck); or nowhere, ``out = h`` (the same
Bottleneck without its shortcut).

An adapter (fastres/adapters/) turns one library's block into a :class:`ResidualBlock`; plans
read only this description, never a library's attribute names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from fastres.activation import ACTIVATIONS, activation_name

__all__ = [
    "ADD_AFTER_ACTIVATION",
    "ADD_BEFORE_ACTIVATION",
    "ADD_POSITIONS",
    "NO_ADD",
    "NetworkStem",
    "ResidualBlock",
    "Stage",
    "activation_name",
    "conv_issue",
    "conv_norm_stage",
    "norm_issue",
]

# The activations the fused ops apply, by the name the ops take.
FUSED_ACTIVATIONS = ACTIVATIONS

# Where a block adds its shortcut (ResidualBlock.add_position).
ADD_BEFORE_ACTIVATION = "before activation"
ADD_AFTER_ACTIVATION = "after activation"
NO_ADD = "no add"
ADD_POSITIONS = (ADD_BEFORE_ACTIVATION, ADD_AFTER_ACTIVATION, NO_ADD)


def conv_issue(conv: nn.Module) -> str:
    """Why the fused ops cannot run ``conv`` ("" when they can): an exact ``nn.Conv2d`` without
    bias, zero padding given as numbers."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.bias is not None:
        return "a convolution has a bias"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"a convolution pads with {conv.padding_mode!r} / {conv.padding!r}"
    return ""


def norm_issue(norm: nn.Module) -> str:
    """Why the fused ops cannot run ``norm`` ("" when they can): an exact ``nn.BatchNorm2d`` or
    :class:`fastres.SyncBatchNorm2d` (FrozenBatchNorm2d, GroupNorm, nn.SyncBatchNorm: no)."""
    # SyncBatchNorm2d by the marker its own class defines (not a subclass's): plans do not
    # import the module layer.
    if type(norm) is nn.BatchNorm2d or vars(type(norm)).get("synchronises_statistics", False):
        return ""
    return f"{type(norm).__name__} is not an nn.BatchNorm2d"


@dataclass(frozen=True)
class Stage:
    """One step of a branch: ``activation(norm(conv(h)))``; ``activation`` by
    :func:`activation_name`."""

    conv: nn.Module
    norm: nn.Module
    activation: str

    def issue(self, activations: tuple[str, ...]) -> str:
        """Why the fused ops cannot run this stage with one of ``activations`` ("" when they
        can)."""
        why = conv_issue(self.conv) or norm_issue(self.norm)
        if not why and self.activation not in activations:
            why = f"the activation is {self.activation}"
        return why


def conv_norm_stage(shortcut: nn.Module | None) -> Stage | None:
    """A shortcut that is ``Sequential(convolution, norm)`` (torchvision's and timm's
    downsample branch) as one stage without activation, else None (run as its own modules)."""
    if type(shortcut) is nn.Sequential and len(shortcut) == 2:
        return Stage(shortcut[0], shortcut[1], "identity")
    return None


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block as plans see it.

    Attributes:
        module: the block itself (its training flag; the key of per-block caches).
        stages: the main branch in order; the last stage's activation is ``"identity"``, its
            output meets the shortcut.
        shortcut: the shortcut's module, run on the block's input; None for the identity.
        shortcut_stage: the shortcut as one (convolution, BatchNorm) stage when it is exactly
            that (folded eval folds it), else None.
        activation: applied after the add ("identity" unless ``add_position`` is
            :data:`ADD_BEFORE_ACTIVATION`).
        reference: the library's own forward, the computation every plan reproduces.
        layer_issue: why a layer outside the chain above keeps the fused ops from reproducing
            the block as it is now ("" when none does): timm's DropPath in training, an
            identity in eval.
        add_position: where the shortcut is added, one of :data:`ADD_POSITIONS`; with
            :data:`NO_ADD` the shortcut is not used.
    """

    module: nn.Module
    stages: tuple[Stage, ...]
    shortcut: nn.Module | None
    shortcut_stage: Stage | None
    activation: str
    reference: Callable[[Tensor], Tensor]
    layer_issue: str = ""
    add_position: str = ADD_BEFORE_ACTIVATION

    @property
    def norms(self) -> list[nn.Module]:
        return [stage.norm for stage in self.stages]

    @property
    def convs(self) -> list[nn.Module]:
        return [stage.conv for stage in self.stages]

    @property
    def activations(self) -> tuple[str, ...]:
        """Every stage's activation, then the one after the add."""
        return tuple(stage.activation for stage in self.stages) + (self.activation,)

    @property
    def layers(self) -> list[nn.Module]:
        """The modules whose parameters the block computes with: the block itself."""
        return [self.module]

    def fusion_issue(self) -> str:
        """Why the fused ops cannot reproduce this block ("" when they can)."""
        if self.layer_issue:
            return self.layer_issue
        if self.add_position != ADD_BEFORE_ACTIVATION:  # every stage keeps its activation
            if self.activation != "identity":
                return f"the activation after the add is {self.activation}"
            return next((why for s in self.stages if (why := s.issue(FUSED_ACTIVATIONS))), "")
        *inner, last = self.stages
        for stage in inner:
            if why := stage.issue(FUSED_ACTIVATIONS):
                return why
        if why := last.issue(("identity",)):
            return why
        if self.activation not in FUSED_ACTIVATIONS:
            return f"the activation after the add is {self.activation}"
        return ""


@dataclass(frozen=True)
class NetworkStem:
    """A network's stem as plans see it: ``pool(activation(norm(conv(x))))``.

    Attributes:
        module: the module that holds the stem (its training flag; the key of the folded
            weights' cache).
        stage: the convolution, BatchNorm and activation.
        pool: the pooling after them.
        reference: the library's own forward of ``module``: the stem's, or for torchvision's
            ``ResNet``, whose stem is no module of its own, the whole network's.
    """

    module: nn.Module
    stage: Stage
    pool: nn.Module
    reference: Callable[[Tensor], Tensor]

    add_position = NO_ADD  # a stem has no shortcut

    @property
    def norms(self) -> list[nn.Module]:
        return [self.stage.norm]

    @property
    def activations(self) -> tuple[str, ...]:
        return (self.stage.activation,)

    @property
    def layers(self) -> list[nn.Module]:
        """The modules whose parameters the stem computes with: its convolution and norm."""
        return [self.stage.conv, self.stage.norm]

    def fusion_issue(self) -> str:
        """Why the fused ops cannot reproduce this stem ("" when they can)."""
        return self.stage.issue(ACTIVATIONS)
