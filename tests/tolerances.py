"""The tolerance rule, written once.

* float64 is compared with PyTorch's float64 result, tightly (TIGHT).
* float32, float16 and bfloat16 follow the rule of flash-attention's tests: measured against a
  float64 reference computed from the same (rounded) inputs, fastres's error may be at most twice
  PyTorch's own error in the same precision, plus FLOOR_ULPS units in the last place of the
  reference's magnitude (a few roundings in the per-channel arithmetic; without a floor, a result
  where PyTorch happens to be exact would demand an exact fastres one). For float32
  this is as tight as PyTorch itself: per-channel gradient sums over 25 000+ elements carry
  rounding error of about 1e-4 in PyTorch's own result, which a fixed rtol of 1e-5 against
  PyTorch's float32 would wrongly blame on fastres.
"""

from __future__ import annotations

import torch

TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Dtypes compared with the error-factor rule against a float64 reference.
RULE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ERROR_FACTOR = 2.0
FLOOR_ULPS = 4


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
    assert ours <= ERROR_FACTOR * theirs + floor, (
        f"{what}: error {ours:.3g} against float64 exceeds {ERROR_FACTOR} x PyTorch's "
        f"{low_dtype} error {theirs:.3g} + {floor:.3g}"
    )
