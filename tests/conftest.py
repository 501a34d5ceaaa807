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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
