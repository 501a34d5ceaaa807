"""The parity check before any timing: errors against a float64 run of torchvision's model.

The rule is the tests' (:mod:`fastres.testing`): against a float64 run of torchvision's model on
the same batch, fastres's error may be at most ERROR_FACTOR times torchvision's own error in the
same precision, plus a floor of a few units in the last place. Errors are relative: max |a - b| /
max |b| for outputs, ||a - b|| / ||b|| over all parameter gradients (float32 gradients of a random
deep network differ from float64 by a few percent in PyTorch itself).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastres.bench.models import autocast, training_loss
from fastres.testing import within_error_factor


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _relative_norm(a: list, b: list) -> float:
    diff = torch.cat([(x.float() - y.float()).flatten() for x, y in zip(a, b, strict=True)])
    return (diff.norm() / torch.cat([y.float().flatten() for y in b]).norm()).item()


def _train_and_eval(model: nn.Module, x, labels, device, dtype, low_precision=True):
    """Training logits and parameter gradients of one forward/backward, then eval logits; under
    autocast to ``dtype`` when ``low_precision``."""
    compute = dtype if low_precision else torch.float32
    model.train()
    with autocast(device, compute):
        logits = model(x)
    # The loss in float32, or in float64 for the float64 reference.
    training_loss(logits, labels).backward()
    model.eval()
    with torch.no_grad(), autocast(device, compute):
        eval_logits = model(x)
    return {
        "train output": logits.detach(),
        # Parameters that take no gradient (an Ultralytics detector's fixed DFL weights) count
        # as zero: they are in every copy alike.
        "gradients": [
            torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()
        ],
        "eval output": eval_logits,
    }


def _error(values, exact) -> float:
    if isinstance(exact, list):
        return _relative_norm(values, exact)
    return _relative(values, exact)


def check_parity(reference: nn.Module, candidate: nn.Module, x, labels, device, dtype) -> dict:
    """Errors against a float64 run of the reference, for a copy of the reference and for the
    candidate itself (compiled or not, as it will be measured), on the same batch.

    Returns {quantity: (candidate error, torchvision error)}.
    """
    exact = _train_and_eval(
        copy.deepcopy(reference).double(), x.double(), labels, device, dtype, low_precision=False
    )
    theirs = _train_and_eval(copy.deepcopy(reference), x, labels, device, dtype)
    ours = _train_and_eval(candidate, x, labels, device, dtype)
    return {
        name: (_error(ours[name], exact[name]), _error(theirs[name], exact[name])) for name in exact
    }


def parity_passes(parity: dict, dtype: torch.dtype) -> bool:
    return all(within_error_factor(ours, theirs, dtype) for ours, theirs in parity.values())


def check_eval_parity(reference: nn.Module, outputs: torch.Tensor, x: torch.Tensor) -> dict:
    """The eval-output error of ``outputs`` (another runtime's logits for ``x``, float32)
    against a float64 eval of the reference, beside the reference's own float32 error.

    Returns {"inference output": (their error, the reference's error)}.
    """
    with torch.no_grad():
        exact = copy.deepcopy(reference).double().eval()(x.double())
        own = copy.deepcopy(reference).eval()(x)
    return {"inference output": (_relative(outputs, exact), _relative(own, exact))}
