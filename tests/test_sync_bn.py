"""Synchronized BatchNorm (sync_bn=True): the split ops, the modules, and multi-process runs.

The multi-process tests start 2 and 3 gloo processes on CPU (NCCL on two GPUs, skipped without
them); see tests/sync_bn_harness.py for what each process compares against one process on the
whole batch.
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from sync_bn_harness import SCENARIOS, run_group
from torch import nn

import fastres
from fastres import FastBasicBlock, FastBottleneck, SyncBatchNorm2d
from fastres.activation import apply_activation
from fastres.ops.bn_act import silu_input_grad
from fastres.ops.registry import op
from fastres.testing import backend_params

# ---------------------------------------------------------------------------------------------
# The split ops, one process: they compose to bn_act's training forward and backward

# triton runs on CUDA tensors with a GPU, else under the interpreter (tests/conftest.py). The
# torch backend has no pieces but bn_stats: its from-stats ops recompute the statistics.
SPLIT_BACKENDS = backend_params("cpu", "cuda", "triton", triton="either")


class _Pieces:
    """A backend's pieces of bn_act, by what they do."""

    def __init__(self, backend):
        self.stats = op("bn_stats", backend)
        self.forward = op("bn_act_forward", backend)
        self.backward_reduce = op("bn_act_backward_reduce", backend)
        self.backward_apply = op("bn_act_backward_apply", backend)


def _device(backend):
    return (
        "cuda"
        if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
        else "cpu"
    )


@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "activation,residual", [("relu", True), ("identity", False), ("silu", True)]
)
def test_split_ops_compose_to_batch_norm_training(backend, channels_last, activation, residual):
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 4, 7, generator=gen, dtype=dtype) * 2 + 3).to(_device(backend))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(5, generator=gen, dtype=x.dtype).add(0.5).to(x.device)
    bias = torch.randn(5, generator=gen, dtype=x.dtype).to(x.device)
    res = torch.randn_like(x) if residual else None
    grad = torch.randn_like(x)
    ops = _Pieces(backend)
    param = torch.float64 if dtype == torch.float64 else torch.float32

    mean, var = ops.stats(x)
    out, _, _, mask = ops.forward(
        x, weight.to(param), bias.to(param), res, mean, var, False, 0.0, 1e-5, activation
    )
    relu = activation == "relu"
    # The backward pieces take the gradient at SiLU's input (the autograd formulas' first step).
    grad_in = (
        silu_input_grad(
            ops.forward, grad, x, weight.to(param), bias.to(param), res, mean, var, 1e-5
        )
        if activation == "silu"
        else grad
    )
    sum_grad, sum_centred = ops.backward_reduce(grad_in, x, mean, mask, relu)
    grad_x, grad_res = ops.backward_apply(
        grad_in,
        x,
        weight.to(param),
        mean,
        var,
        mask,
        sum_grad,
        sum_centred,
        3 * 4 * 7,
        1e-5,
        relu,
        residual,
    )

    xr = x.detach().double().requires_grad_()
    rr = res.detach().double().requires_grad_() if residual else None
    ref = F.batch_norm(xr, None, None, weight.double(), bias.double(), True, 0.0, 1e-5)
    ref = ref + rr if residual else ref
    pre = ref
    ref = apply_activation(ref, activation)
    (gm,) = torch.autograd.grad(ref, pre, grad.double(), retain_graph=True)
    ref.backward(grad.double())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, **tol)
    torch.testing.assert_close(var.double(), var_ref, **tol)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(grad_x.double(), xr.grad, **tol)
    if residual:
        torch.testing.assert_close(grad_res.double(), rr.grad, **tol)
    torch.testing.assert_close(sum_grad.double(), gm.sum(dim=(0, 2, 3)), **tol)


@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
def test_split_ops_on_an_empty_batch(backend):
    """A process with no samples: NaN statistics (PyTorch's), zero sums, empty gradients."""
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    x = torch.empty(0, 4, 3, 3, dtype=dtype, device=_device(backend))
    ops = _Pieces(backend)
    mean, var = ops.stats(x)
    assert mean.isnan().all() and var.isnan().all()
    stats = torch.zeros(4, dtype=mean.dtype, device=x.device)
    out, _, _, mask = ops.forward(x, None, None, None, stats, stats + 1, False, 0.0, 1e-5, "relu")
    sum_grad, sum_centred = ops.backward_reduce(out, x, stats, mask, True)
    assert torch.equal(sum_grad.cpu(), torch.zeros(4, dtype=mean.dtype))
    assert torch.equal(sum_centred.cpu(), torch.zeros(4, dtype=mean.dtype))
    grad_x, _ = ops.backward_apply(
        out, x, None, stats, stats + 1, mask, sum_grad + 1, sum_centred, 10, 1e-5, True, False
    )
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("name", ["bn_stats", "bn_act_backward_reduce", "bn_act_backward_apply"])
@pytest.mark.parametrize("family", ["", "_triton"])
def test_split_ops_pass_opcheck(name, family):
    device = _device("triton" if family else "cpu")
    x = torch.randn(2, 3, 4, 5, device=device)
    grad = torch.randn_like(x)
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    mask = torch.full(((x.numel() + 7) // 8,), 0xAA, dtype=torch.uint8, device=device)
    vector = lambda: torch.randn(3, device=device)  # noqa: E731
    args = {
        "bn_stats": (x,),
        "bn_act_backward_reduce": (grad, x, mean, mask, True),
        "bn_act_backward_apply": (
            grad,
            x,
            vector().abs(),
            mean,
            var,
            mask,
            vector(),
            vector(),
            40,
            1e-5,
            True,
            True,
        ),
    }[name]
    op = getattr(torch.ops.fastres, name + family)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


FROM_STATS_OPS = ["bn_act_from_stats", "bn_act_add_from_stats", "bn_act_conv2d_from_stats"]


@pytest.mark.parametrize("backend", backend_params(triton="either"))
@pytest.mark.parametrize("activation", ["relu", "silu", "identity"])
@pytest.mark.parametrize("name", FROM_STATS_OPS)
def test_from_stats_ops_match_batch_norm_training(backend, activation, name):
    """The from-stats ops with x's own statistics: outputs and every gradient (the residual's
    included) of a training-mode F.batch_norm composition (float64 where the backend takes
    it)."""
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 4, 7, generator=gen, dtype=dtype) * 2 + 3).to(_device(backend))
    weight = torch.rand(5, generator=gen, dtype=dtype).add(0.5).to(x.device)
    bias = torch.randn(5, generator=gen, dtype=dtype).to(x.device)
    residual = torch.randn_like(x)
    conv_weight = torch.randn(6, 5, 3, 3, generator=gen, dtype=dtype).to(x.device)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual, conv_weight)]
    xs, ws, bs, rs, cs = leaves
    if name == "bn_act_conv2d_from_stats":
        out = op(name, backend)(
            xs, ws, bs, cs, mean, var, 84, [1, 1], [1, 1], [1, 1], 1, 1e-5, activation, ""
        )
        used = [0, 1, 2, 4]  # x, weight, bias, conv_weight
    else:
        out = op(name, backend)(xs, ws, bs, rs, mean, var, 84, 1e-5, activation, "")
        out = out[0] if name == "bn_act_from_stats" else out
        used = [0, 1, 2, 3]  # x, weight, bias, residual
    grad = torch.randn_like(out)
    out.backward(grad)

    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual, conv_weight)]
    xr, wr, br, rr, cr = refs
    ref = F.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5)
    if name == "bn_act_from_stats":
        ref = apply_activation(ref + rr, activation)
    elif name == "bn_act_add_from_stats":
        ref = apply_activation(ref, activation) + rr
    else:
        ref = F.conv2d(apply_activation(ref, activation), cr, padding=1)
    ref.backward(grad.double())
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    for i in used:
        torch.testing.assert_close(leaves[i].grad.double(), refs[i].grad, **tol)


@pytest.mark.parametrize("family", ["", "_triton"])
@pytest.mark.parametrize("name", FROM_STATS_OPS)
def test_from_stats_ops_pass_opcheck(name, family):
    device = _device("triton" if family else "cpu")
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    weight = torch.rand(3, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    if name != "bn_act_conv2d_from_stats":
        residual = torch.randn_like(x, requires_grad=True)
        activation = "relu" if name == "bn_act_from_stats" else "silu"
        args = (x, weight, bias, residual, mean, var, 40, 1e-5, activation, "")
    else:
        conv_weight = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
        args = (
            x,
            weight,
            bias,
            conv_weight,
            mean,
            var,
            40,
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            1e-5,
            "silu",
            "",
        )
    torch.library.opcheck(getattr(torch.ops.fastres, name + family), args)


def test_backward_apply_rejects_a_count_smaller_than_the_batch():
    x = torch.randn(2, 3, 4, 5)
    mask = torch.zeros(((x.numel() + 7) // 8,), dtype=torch.uint8)
    with pytest.raises(ValueError, match="count must be the number of values per channel"):
        torch.ops.fastres.bn_act_backward_apply(
            x,
            x,
            None,
            torch.zeros(3),
            torch.ones(3),
            mask,
            torch.zeros(3),
            torch.zeros(3),
            7,
            1e-5,
            True,
            False,
        )


# ---------------------------------------------------------------------------------------------
# Modules and convert(), one process


def test_blocks_with_sync_bn_make_every_batch_norm_synchronised():
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = FastBottleneck(8, 4, downsample=downsample, sync_bn=True, backend="cpu")
    norms = [block.bn1, block.bn2, block.bn3, block.downsample[1]]
    assert all(type(bn) is SyncBatchNorm2d and bn.backend == "cpu" for bn in norms)
    basic = FastBasicBlock(8, 8, sync_bn=True)
    assert type(basic.bn1) is SyncBatchNorm2d and type(basic.bn2) is SyncBatchNorm2d
    assert type(FastBottleneck(8, 2).bn1) is nn.BatchNorm2d


def test_convert_with_sync_bn_keeps_every_tensor_and_revert_undoes_it():
    model = torchvision.models.resnet18(num_classes=3)
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    fast = fastres.convert(model, sync_bn=True, inplace=True)
    norms = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(type(m) is SyncBatchNorm2d for m in norms)
    assert all(fast.state_dict(keep_vars=True)[k] is t for k, t in tensors.items())
    back = fastres.revert(fast, inplace=True)
    assert all(type(m) is nn.BatchNorm2d for m in back.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(hasattr(m, "process_group") for m in back.modules())
    assert all(back.state_dict(keep_vars=True)[k] is t for k, t in tensors.items())


def test_convert_rejects_a_process_group_without_sync_bn():
    with pytest.raises(ValueError, match="process_group is only used with sync_bn=True"):
        fastres.convert(torchvision.models.resnet18(), process_group=object())


def test_sync_bn_in_training_without_a_process_group_is_a_clear_error():
    model = fastres.resnet18(num_classes=3, sync_bn=True)
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="init_process_group"):
        model(x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        SyncBatchNorm2d(3)(x)
    for k, v in model.state_dict().items():  # nothing was updated on the way to the error
        if k.endswith("num_batches_tracked"):
            continue  # counted before the error, as nn.BatchNorm2d counts before F.batch_norm
        assert torch.equal(v, before[k]), k


def test_sync_bn_in_eval_needs_no_process_group_and_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=3).eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
    fast = fastres.convert(reference, sync_bn=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)
        bn = SyncBatchNorm2d.from_batch_norm(copy.deepcopy(reference.bn1)).eval()
        y = torch.randn(2, 64, 5, 5)
        torch.testing.assert_close(bn(y), reference.bn1(y))


# ---------------------------------------------------------------------------------------------
# Several processes against one process on the whole batch

GLOO_SCENARIOS = {
    2: [
        "blocks-cpu-float64",
        "resnet-cpu-float64",
        "resnet-cpu-float32",
        "blocks-torch-float64",
        "blocks-triton-float32",
    ],
    3: [
        "blocks-cpu-float64",
        "variants-cpu-float64",
        "resnet-cpu-float64",
        "resnet-torch-float64",
        "blocks-triton-float32",
    ],
}
NCCL_SCENARIOS = ["blocks-cuda-float32", "resnet-cuda-float32", "blocks-triton-float32"]


def _scenario_params(world_size):
    params = []
    for name in GLOO_SCENARIOS[world_size]:
        # Triton on CPU tensors needs the interpreter, i.e. no GPU; with GPUs the Triton
        # scenario runs on them in the NCCL test.
        marks = [pytest.mark.triton_interpreter] if "triton" in name else []
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """Runs each world size's scenarios once, in one group of processes, on first use."""
    cache = {}

    def results(world_size):
        if world_size not in cache:
            names = [
                n
                for n in GLOO_SCENARIOS[world_size]
                if not ("triton" in n and torch.cuda.is_available())
            ]
            workdir = tmp_path_factory.mktemp(f"gloo{world_size}")
            cache[world_size] = run_group(world_size, names, "cpu", workdir)
        return cache[world_size]

    return results


def _assert_every_rank_ok(results, name):
    failures = {rank: text for rank, text in results[name].items() if text != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{t}" for r, t in failures.items())


@pytest.mark.parametrize("name", _scenario_params(2))
def test_two_gloo_processes_match_one_process_on_the_whole_batch(gloo_results, name):
    _assert_every_rank_ok(gloo_results(2), name)


@pytest.mark.parametrize("name", _scenario_params(3))
def test_three_gloo_processes_match_one_process_on_the_whole_batch(gloo_results, name):
    _assert_every_rank_ok(gloo_results(3), name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_nccl_processes_match_one_process_on_the_whole_batch(tmp_path):
    results = run_group(2, NCCL_SCENARIOS, "cuda", tmp_path)
    for name in NCCL_SCENARIOS:
        _assert_every_rank_ok(results, name)


def test_every_scenario_is_defined():
    for names in list(GLOO_SCENARIOS.values()) + [NCCL_SCENARIOS]:
        assert set(names) <= set(SCENARIOS)


def test_ddp_example_trains_a_converted_resnet50_under_torchrun():
    """examples/train_ddp.py as the README starts it, at a tiny size: two gloo processes."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(root / "examples" / "train_ddp.py"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--image-size",
        "64",
        "--num-classes",
        "10",
        "--workers",
        "0",
    ]
    env = dict(os.environ)
    if torch.cuda.device_count() < 2:  # one process per GPU, else both on CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 2/2" in result.stdout, result.stdout
    loss = float(result.stdout.split("step 2/2")[1].split("loss")[1].split()[0])
    assert math.isfinite(loss)


def test_bn_act_add_from_stats_requires_a_residual():
    from fastres.ops.bn_act_from_stats import bn_act_add_from_stats

    x = torch.randn(2, 3, 4, 5)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    with pytest.raises(TypeError, match="bn_act_add_from_stats: residual must be a Tensor"):
        bn_act_add_from_stats(x, None, None, mean, var, residual=None, backend="cpu")  # type: ignore[arg-type]
