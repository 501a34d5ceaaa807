"""fastres.triton.interpreter: run-time loop bounds work under the installed Triton interpreter,
natively (Triton 3.7) or repaired (Triton 3.6 with NumPy 2.5), and fastres.info() says which."""

import pytest

import fastres

pytestmark = pytest.mark.triton_interpreter


def test_loop_with_run_time_bounds_runs_and_info_says_how():
    from fastres.triton.interpreter import _loop_bounds_work, loop_bounds_status

    status = loop_bounds_status()
    assert status in ("native", "repaired")
    assert _loop_bounds_work()  # the 5-step loop ran 5 times
    reported = fastres.info()["triton_interpreter"]
    assert reported == "on" if status == "native" else reported.startswith("on; run-time loop")
