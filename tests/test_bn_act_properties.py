"""Property-based tests: random shapes, strides, memory formats, dtypes and flags."""

import os

import pytest
import torch
from bn_act_harness import Case, SlicedView, TransposedView, check_case
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastres.activation import ACTIVATIONS

# CI runs a fixed set of examples so that a submission's result does not depend on the draw;
# locally each run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

LAYOUTS = {
    "contiguous": (torch.contiguous_format, None),
    "channels_last": (torch.channels_last, None),
    "sliced": (torch.contiguous_format, SlicedView()),
    "sliced_channels_last": (torch.channels_last, SlicedView()),
    "transposed": (torch.contiguous_format, TransposedView()),
}


@st.composite
def cases(draw, max_channels=17, max_side=7):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, max_channels))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    training = draw(st.booleans())
    if training and n * h * w == 1:
        w = 2  # one value per channel is an error in training (tested in test_bn_act_errors)
    memory_format, view = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    return Case(
        shape=(n, c, h, w),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        memory_format=memory_format,
        view=view,
        residual=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()) or not training,
        training=training,
        steps=draw(st.integers(1, 3)),
        momentum=draw(st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Two values a channel whose spread is small against its mean (channel 5: 1.85 and 1.91): the
# normalisation divides the rounding error of a float32 mean by the standard deviation. Found by
# a random draw; the CPU kernels then kept the mean in float32 (error 2.2e-6 against PyTorch's
# 5.9e-7).
@example(case=Case(shape=(1, 8, 1, 2), seed=5))
@example(case=Case(shape=(1, 8, 1, 2), seed=5, memory_format=torch.channels_last, steps=1))
@settings(max_examples=80, **COMMON)
@given(case=cases())
def test_cpu_backend_matches_reference(case):
    check_case("cpu", "cpu", case)


@pytest.mark.triton_interpreter
@settings(max_examples=15, **COMMON)
@given(case=cases(max_channels=9, max_side=5))
def test_triton_interpreter_matches_reference(case):
    check_case("triton", "cpu", case)


@pytest.mark.cuda
@settings(max_examples=80, **COMMON)
@given(case=cases(max_channels=70, max_side=17))
def test_cuda_backend_matches_reference(case):
    check_case("cuda", "cuda", case)


@pytest.mark.cuda
@settings(max_examples=40, **COMMON)
@given(case=cases(max_channels=70, max_side=17))
def test_triton_gpu_matches_reference(case):
    check_case("triton", "cuda", case)
