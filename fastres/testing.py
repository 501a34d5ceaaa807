"""What fastres's tests, benchmarks and ``python -m fastres.bench`` share, for anyone checking
fastres (or their own kernels) the same way.

* **The tolerance rule**, written once. float64 is compared with PyTorch's float64 result
  tightly (:data:`TIGHT`). float32, float16 and bfloat16 follow the rule of flash-attention's
  tests: against a float64 reference computed from the same (rounded) inputs, the error may be
  at most :data:`ERROR_FACTOR` times PyTorch's own error in the same precision, plus
  :data:`FLOOR_ULPS` units in the last place of the reference's magnitude (a few roundings in
  the per-channel arithmetic; without a floor, a result where PyTorch happens to be exact would
  demand an exact one). For float32 this is as tight as PyTorch itself: per-channel gradient
  sums over 25,000+ elements carry rounding error of about 1e-4 in PyTorch's own result, which a
  fixed rtol of 1e-5 against PyTorch's float32 would wrongly blame on fastres.
* **ResNet-50's layer shapes**: every distinct convolution and BatchNorm.
* **Backend parametrisations** for pytest, derived from :data:`fastres.backends.BACKENDS`, each
  marked with what it needs (``cuda``: a CUDA GPU; ``triton_interpreter``: Triton on CPU
  tensors, without a GPU). pytest is imported only when they are asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from fastres.backends import BACKENDS

__all__ = [
    "ERROR_FACTOR",
    "FLOOR_ULPS",
    "RESNET50_BN_CONV",
    "RESNET50_BN_SHAPES",
    "RESNET50_CONVOLUTIONS",
    "RULE_DTYPES",
    "TIGHT",
    "assert_close",
    "assert_within_error_factor",
    "backend_device_params",
    "backend_params",
    "conv_id",
    "randomise_batch_norms",
    "within_error_factor",
]

# ---------------------------------------------------------------------------------------------
# The tolerance rule

TIGHT: dict[torch.dtype, dict[str, Any]] = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Dtypes compared with the error-factor rule against a float64 reference.
RULE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ERROR_FACTOR = 2.0
FLOOR_ULPS = 4


def within_error_factor(
    ours: float, theirs: float, low_dtype: torch.dtype, magnitude: float = 1.0
) -> bool:
    """The rule on two errors against float64: ``ours <= ERROR_FACTOR * theirs + FLOOR_ULPS
    ulp(magnitude)`` in ``low_dtype``."""
    return ours <= ERROR_FACTOR * theirs + FLOOR_ULPS * torch.finfo(low_dtype).eps * magnitude


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Tight comparison for float64 results; integer results (counters) must be equal."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not expected.dtype.is_floating_point:
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    torch.testing.assert_close(
        actual, expected, msg=lambda m: f"{what}: {m}", **TIGHT[expected.dtype]
    )


def assert_within_error_factor(
    actual: torch.Tensor,
    torch_low: torch.Tensor,
    reference_fp64: torch.Tensor,
    what: str,
    low_dtype: torch.dtype,
    term_magnitude: float = 0.0,
) -> None:
    """The rule: max |ours - ref64| <= 2 max |torch_low - ref64| + 4 ulp(magnitude).

    The magnitude is that of the reference, or `term_magnitude` when larger: the size of the terms
    a result is summed from, when they cancel (BatchNorm's input gradient with two or three values
    per channel is almost all cancellation, and then both results are rounding noise).
    """
    assert actual.shape == reference_fp64.shape, f"{what}: shape {actual.shape}"
    ref = reference_fp64.double()
    ours = (actual.double() - ref).abs().max().item() if ref.numel() else 0.0
    theirs = (torch_low.double() - ref).abs().max().item() if ref.numel() else 0.0
    magnitude = max(1.0, term_magnitude, ref.abs().max().item() if ref.numel() else 0.0)
    floor = FLOOR_ULPS * torch.finfo(low_dtype).eps * magnitude
    assert within_error_factor(ours, theirs, low_dtype, magnitude), (
        f"{what}: error {ours:.3g} against float64 exceeds {ERROR_FACTOR} x PyTorch's "
        f"{low_dtype} error {theirs:.3g} + {floor:.3g}"
    )


# ---------------------------------------------------------------------------------------------
# ResNet-50's layer shapes

# (C_in, side, C_out, kernel, stride, groups): every distinct convolution of ResNet-50 (and the
# grouped 3x3 of ResNeXt-50's first stage); padding kernel // 2, dilation 1.
RESNET50_CONVOLUTIONS = [
    (3, 224, 64, 7, 2, 1),
    (64, 56, 64, 1, 1, 1),
    (64, 56, 64, 3, 1, 1),
    (64, 56, 256, 1, 1, 1),
    (256, 56, 64, 1, 1, 1),
    (256, 56, 128, 1, 1, 1),
    (128, 56, 128, 3, 2, 1),
    (128, 28, 512, 1, 1, 1),
    (256, 56, 512, 1, 2, 1),
    (512, 28, 128, 1, 1, 1),
    (128, 28, 128, 3, 1, 1),
    (512, 28, 256, 1, 1, 1),
    (256, 28, 256, 3, 2, 1),
    (256, 14, 1024, 1, 1, 1),
    (512, 28, 1024, 1, 2, 1),
    (1024, 14, 256, 1, 1, 1),
    (256, 14, 256, 3, 1, 1),
    (1024, 14, 512, 1, 1, 1),
    (512, 14, 512, 3, 2, 1),
    (512, 7, 2048, 1, 1, 1),
    (1024, 14, 2048, 1, 2, 1),
    (2048, 7, 512, 1, 1, 1),
    (512, 7, 512, 3, 1, 1),
    (128, 56, 128, 3, 1, 32),
]

# ResNet-50's distinct BatchNorm shapes (channels, height = width), and whether a residual is
# added there (the last BatchNorm of each bottleneck).
RESNET50_BN_SHAPES = [
    (64, 112, False),
    (64, 56, False),
    (128, 56, False),
    (256, 56, True),
    (128, 28, False),
    (256, 28, False),
    (512, 28, True),
    (256, 14, False),
    (512, 14, False),
    (1024, 14, True),
    (512, 7, False),
    (2048, 7, True),
]


# (BatchNorm channels, side, conv out channels, kernel, stride): ResNet-50's BatchNorm + ReLU ->
# convolution pairs inside a bottleneck (bn1 -> conv2, the 3x3; bn2 -> conv3, the expanding 1x1),
# what bn_act_conv2d fuses.
RESNET50_BN_CONV = [
    (c_in, side, c_out, kernel, stride)
    for c_in, side, c_out, kernel, stride, groups in RESNET50_CONVOLUTIONS
    if groups == 1 and (kernel == 3 or (kernel == 1 and c_out == 4 * c_in))
]


def conv_id(spec: tuple[int, ...]) -> str:
    """'64x56-3x3s1-64': input channels x side, kernel and stride (and groups), output channels."""
    c, s, o, k, st, g = spec
    return f"{c}x{s}-{k}x{k}s{st}" + (f"g{g}" if g > 1 else "") + f"-{o}"


# ---------------------------------------------------------------------------------------------
# Backend parametrisations


def _param(values: Any, id: str, mark: str | None) -> Any:
    import pytest

    marks = [getattr(pytest.mark, mark)] if mark else []
    return pytest.param(*values, id=id, marks=marks)


def backend_params(*names: str, triton: str = "interpreter") -> list[Any]:
    """pytest parameters, one per backend of ``names`` (default: every backend): ``cuda`` marked
    ``cuda``; ``triton`` marked ``triton_interpreter`` (``triton="interpreter"``: the test runs
    it on CPU tensors, and without a GPU only), or unmarked (``triton="either"``: the test puts
    it on a GPU when there is one, else interprets it)."""
    if triton not in ("interpreter", "either"):
        raise ValueError(f"triton must be 'interpreter' or 'either', got {triton!r}")
    marks = {"cuda": "cuda", "triton": "triton_interpreter" if triton == "interpreter" else None}
    return [_param((name,), name, marks.get(name)) for name in names or BACKENDS]


def backend_device_params(*names: str, triton_interpreter: bool = True) -> list[Any]:
    """pytest parameters ``(backend, device)`` for the backends of ``names`` (default: every
    backend) where they run: cpu and torch on CPU, cuda on a GPU, triton on a GPU (id
    ``triton-gpu``) and, with ``triton_interpreter``, on CPU tensors under the interpreter (id
    ``triton-interpreter``)."""
    params = []
    for name in names or BACKENDS:
        if name in ("cpu", "torch"):
            params.append(_param((name, "cpu"), name, None))
        elif name == "cuda":
            params.append(_param((name, "cuda"), name, "cuda"))
        else:
            params.append(_param((name, "cuda"), f"{name}-gpu", "cuda"))
            if triton_interpreter:
                params.append(_param((name, "cpu"), f"{name}-interpreter", "triton_interpreter"))
    return params


# ---------------------------------------------------------------------------------------------
# Models to compare


def randomise_batch_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics and affine parameters for every BatchNorm of ``model``, in
    place, so that eval is not an identity and a folded BatchNorm differs from an unfolded one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.BatchNorm2d):
                continue
            c = module.num_features
            values = {
                "running_mean": torch.randn(c, generator=generator) * 0.1,
                "running_var": torch.rand(c, generator=generator) + 0.5,
                "weight": torch.rand(c, generator=generator) + 0.5,
                "bias": torch.randn(c, generator=generator) * 0.1,
            }
            for name, value in values.items():
                tensor = getattr(module, name)
                if tensor is not None:  # affine=False, track_running_stats=False
                    tensor.copy_(value)
