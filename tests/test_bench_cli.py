"""python -m fastres.bench at a tiny size on CPU: parity check, table, CSV and PNG."""

import csv
import subprocess
import sys

import pytest
import torch
from optional_libraries import needs_peers, needs_ultralytics

import fastres
from fastres import bench
from fastres.bench import models as bench_models

TINY = [
    "--device",
    "cpu",
    "--model",
    "resnet18",
    "--batch-size",
    "2",
    "--image-size",
    "32",
    "--rounds",
    "2",
    "--no-compile",
]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_runs_checks_parity_and_writes_csv_and_png(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastres.bench", *TINY, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity, relative error against torchvision in float64" in result.stdout
    rows = _rows(tmp_path / "resnet18_cpu_fp32.csv")
    assert [r["config"] for r in rows] == ["torchvision", "fastres[cpu]"]
    assert all(r["parity_ok"] == "True" and float(r["train_img_s"]) > 0 for r in rows)
    for row in rows:  # medians inside their interquartile ranges, from 2 interleaved rounds
        assert row["rounds"] == "2"
        for mode in ("train", "infer"):
            low, median, high = (float(row[f"{mode}_img_s{k}"]) for k in ("_low", "", "_high"))
            assert 0 < low <= median <= high
    assert rows[0]["train_vs_torchvision"] == "1.0" and rows[0]["train_significant"] == "True"
    assert rows[1]["infer_significant"] in ("True", "False")
    assert "interleaved rounds" in result.stdout
    assert rows[1]["device"] and rows[1]["torch"] == torch.__version__
    assert (tmp_path / "resnet18_cpu_fp32.png").stat().st_size > 0


def test_failing_parity_reports_no_speed_and_exits_non_zero(tmp_path, monkeypatch):
    def broken_fast_model(reference, backend):
        model = fastres.convert(reference, backend=backend)
        with torch.no_grad():
            model.fc.weight.mul_(1.5)  # a wrong model
        return model

    monkeypatch.setattr(bench_models, "build_fast", broken_fast_model)
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 1
    rows = _rows(tmp_path / "resnet18_cpu_fp32.csv")
    failed = rows[1]
    assert failed["parity_ok"] == "False" and failed["train_img_s"] == ""


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch-size", "0"],
        ["--rounds", "0"],
        ["--threads", "0"],
        ["--model", "vgg16"],
        ["--dtype", "fp8"],
        ["--peers", "--device", "cpu", "--dtype", "fp16"],
        ["--freezing", "--no-compile"],
    ],
)
def test_bad_arguments_exit_with_usage(bad):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(bad)
    assert error.value.code == 2


@pytest.mark.parametrize(
    "model",
    [
        "timm:resnet18",
        "hf:resnet-18",
        pytest.param("ultralytics:yolov8-cls-resnet50", marks=needs_ultralytics),
    ],
)
def test_models_of_other_libraries_are_benchmarked_against_their_own(model, tmp_path):
    """The reference row is the library's own model, and fastres's converted copy passes the
    parity check against it. 64 px: at 32 px and batch 2 the last stage normalises two values
    per channel, where every float32 gradient upstream is rounding noise (PyTorch's CPU
    BatchNorm accumulates its statistics in float64 and is less noisy there; fastres's in
    float32)."""
    args = ["--device", "cpu", "--model", model, "--batch-size", "2", "--image-size", "64"]
    args += ["--rounds", "2", "--no-compile"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / f"{model.replace(':', '-')}_cpu_fp32.csv")
    library = {"timm": "timm", "hf": "transformers", "ultralytics": "ultralytics"}[
        model.split(":")[0]
    ]
    assert [row["config"] for row in rows] == [library, "fastres[cpu]"]
    assert rows[1]["parity_ok"] == "True" and rows[1]["train_img_s"]


@needs_peers
def test_peers_are_rows_of_the_same_interleaved_table(tmp_path, capsys):
    """--peers exports the reference to ONNX, runs it on ONNX Runtime and OpenVINO (inference
    only) in the same interleaved rounds, and compares fastres with each: speed, error and
    first-call cost."""
    csv_path = tmp_path / "peers.csv"
    args = [*TINY, "--peers", "--threads", "1", "--csv", str(csv_path), "--no-chart"]
    assert bench.main(args) == 0
    rows = {row["config"]: row for row in _rows(csv_path)}
    assert list(rows) == ["torchvision", "fastres[cpu]", "onnxruntime", "openvino"]
    for peer in ("onnxruntime", "openvino"):
        row = rows[peer]
        assert row["parity_ok"] == "True" and row["train_img_s"] == ""
        assert float(row["infer_img_s"]) > 0 and float(row["first_call_s"]) > 0
        assert 0 < float(row["parity_inference_output"]) < 1e-5
        assert row["threads"] == "1" and row[peer]  # the runtime's version
    fast = rows["fastres[cpu]"]
    assert float(fast["first_call_s"]) > 0
    for peer in ("onnxruntime", "openvino"):
        low, median, high = (float(fast[f"infer_vs_{peer}{k}"]) for k in ("_low", "", "_high"))
        assert 0 < low <= median <= high
        assert float(fast[f"eval_error_vs_{peer}"]) > 0
    assert fast["peers_target_met"] in ("True", "False")
    assert float(fast["onnx_export_s"]) > 0
    assert "against the peers" in capsys.readouterr().out


@needs_peers
def test_cpu_inference_compares_float32_and_bfloat16_with_openvinos_default(tmp_path, capsys):
    """fastres.bench.cpu_inference: every configuration in float32 and bfloat16, OpenVINO at
    its default precision (and float32 forced), each row's error against float64, the CPU's
    instruction sets and the oneDNN kernels, and a target verdict on fastres's bfloat16 rows."""
    from fastres.bench import cpu_inference

    args = ["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--rounds", "2"]
    args += ["--threads", "1", "--no-compile", "--out", str(tmp_path)]
    assert cpu_inference.main(args) == 0
    rows = _rows(tmp_path / "resnet18_cpu_inference_batch2_1thread.csv")
    configs = [(row["config"], row["precision"]) for row in rows]
    for name in ("torchvision", "fastres[cpu]"):
        assert [(name, p) for p in ("fp32", "bf16 autocast", "bf16 cast")] == [
            c for c in configs if c[0] == name
        ]
    openvino = next(r for r in rows if r["config"] == "openvino")
    assert openvino["precision"] == f"{openvino['openvino_default_precision']} (default)"
    assert any(r["config"] == "openvino-f32" and r["precision"] == "f32" for r in rows)
    for row in rows:
        assert float(row["infer_img_s"]) > 0 and 0 < float(row["error_vs_fp64"]) < 0.05
        assert "AVX" in row["cpu_isa"] and "float32:" in row["onednn_kernels"]
    fastres_bf16 = [r for r in rows if r["config"] == "fastres[cpu]" and "bf16" in r["precision"]]
    assert all(r["target_met"] in ("True", "False") for r in fastres_bf16)
    assert "x openvino default" in capsys.readouterr().out


def test_bn_act_shapes_times_fastres_against_atens_composition(tmp_path, monkeypatch, capsys):
    """fastres.bench.bn_act_shapes: per shape, fastres and ATen's composition (as written and in
    torchvision's in-place form), forward and forward + backward, paired ratios, the C++
    kernels' instruction set, and a target verdict on fastres's forward + backward rows in
    bfloat16."""
    from fastres.bench import bn_act_shapes
    from fastres.cpu_isa import cpu_kernel_isa

    monkeypatch.setattr(bn_act_shapes, "RESNET50_BN_SHAPES", [(8, 5, False), (24, 3, True)])
    args = ["--batch-size", "2", "--rounds", "2", "--threads", "1", "--no-compile"]
    assert bn_act_shapes.main(args + ["--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "bn_act_cpu_bf16_batch2_1thread.csv")
    assert [(r["shape"], r["mode"], r["implementation"]) for r in rows] == [
        (shape, mode, impl)
        for shape in ("2x8x5x5", "2x24x3x3")
        for mode in ("forward", "forward_backward")
        for impl in ("fastres", "aten", "aten_inplace")
    ]
    for row in rows:
        assert float(row["ms"]) > 0 and float(row["gb_s"]) > 0
        assert float(row["x_aten"]) > 0 and float(row["x_aten_inplace"]) > 0
        assert row["cpu_kernels"] == cpu_kernel_isa() and row["dtype"] == "bf16"
        judged = row["implementation"] == "fastres" and row["mode"] == "forward_backward"
        assert row["target_met"] in (("True", "False") if judged else ("",))
    assert "x aten" in capsys.readouterr().out


def test_bn_act_shapes_rejects_bad_arguments():
    from fastres.bench import bn_act_shapes

    with pytest.raises(SystemExit):
        bn_act_shapes.main(["--rounds", "0"])


@needs_ultralytics
def test_a_detector_trains_with_its_own_loss_and_is_compared_with_its_fused_model(tmp_path):
    """An Ultralytics detector: the training step minimises Ultralytics' detection loss, and
    inference is timed against its fuse()d model too (inference only); no ResNet target is
    applied to it."""
    args = ["--device", "cpu", "--model", "ultralytics:yolo11n", "--batch-size", "2"]
    args += ["--image-size", "64", "--rounds", "2", "--no-compile"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "ultralytics-yolo11n_cpu_fp32.csv")
    assert [row["config"] for row in rows] == ["ultralytics", "ultralytics+fuse", "fastres[cpu]"]
    fused, fast = rows[1], rows[2]
    assert fused["parity_ok"] == "True" and fused["infer_img_s"] and not fused["train_img_s"]
    assert fast["parity_ok"] == "True" and fast["train_img_s"] and fast["saved_mib"]
    assert not fast.get("saved_target_met") and not fast.get("infer_target_met")
    low, median, high = (float(fast[f"infer_vs_fused{k}"]) for k in ("_low", "", "_high"))
    assert 0 < low <= median <= high


@needs_peers
def test_bfloat16_peers_run_openvino_at_its_default_precision(tmp_path):
    """--dtype bf16 --peers: fastres under bfloat16 autocast against OpenVINO at the precision
    it picks by itself (recorded), ONNX Runtime at its default; parity by each one's rule."""
    csv_path = tmp_path / "peers.csv"
    args = [*TINY, "--dtype", "bf16", "--peers", "--threads", "1", "--csv", str(csv_path)]
    assert bench.main([*args, "--no-chart"]) == 0
    rows = {row["config"]: row for row in _rows(csv_path)}
    assert list(rows) == ["torchvision", "fastres[cpu]", "onnxruntime", "openvino"]
    import openvino

    default = str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    expected = "bf16" if "bf16" in default or "bfloat16" in default else "f32"
    assert {row["openvino_precision"] for row in rows.values()} == {expected}
    assert all(row["parity_ok"] == "True" for row in rows.values())
    assert float(rows["fastres[cpu]"]["infer_vs_openvino"]) > 0


@needs_peers
@needs_ultralytics
def test_a_detector_is_exported_to_the_peers(tmp_path):
    """--peers exports the Ultralytics detector (its eval predictions) to ONNX as well."""
    args = ["--device", "cpu", "--model", "ultralytics:yolo11n", "--batch-size", "2"]
    args += ["--image-size", "64", "--rounds", "1", "--no-compile", "--peers"]
    assert bench.main([*args, "--threads", "1", "--out", str(tmp_path), "--no-chart"]) == 0
    rows = {row["config"]: row for row in _rows(tmp_path / "ultralytics-yolo11n_cpu_fp32.csv")}
    assert list(rows)[-2:] == ["onnxruntime", "openvino"]
    for peer in ("onnxruntime", "openvino"):
        assert rows[peer]["parity_ok"] == "True" and float(rows[peer]["infer_img_s"]) > 0
