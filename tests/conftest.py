"""Test configuration shared by every test module.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter; the variable has to
be set before triton is first imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402,F401  (loads fastres._C and registers the ops)

HAS_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # With a GPU the interpreter is off (it must be chosen before triton is imported); the same
    # Triton cases then run on CUDA tensors instead.
    skip_interpreter = pytest.mark.skip(
        reason="a GPU is present: the interpreter is off and these Triton cases run on CUDA "
        "tensors in their cuda-marked twins"
    )
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "triton_interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interpreter)
