"""Ultralytics, a test dependency everywhere but on the GPU machine, which cannot install it.

Only there may its tests skip: elsewhere a missing ultralytics is an import error, as for the
other test dependencies.
"""

import importlib.util

import pytest
import torch

HAS_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None
if not HAS_ULTRALYTICS and not torch.cuda.is_available():
    raise ImportError("ultralytics is a test dependency (requirements-dev.txt): install it")

needs_ultralytics = pytest.mark.skipif(
    not HAS_ULTRALYTICS, reason="ultralytics is not installed on this GPU machine"
)
