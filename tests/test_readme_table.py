"""The README's performance tables are generated from the committed results, and current."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_table():
    path = os.path.join(ROOT, "benchmarks", "readme_table.py")
    spec = importlib.util.spec_from_file_location("readme_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_what_the_committed_results_generate():
    table = _readme_table()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme == table.updated(readme), (
        "run python benchmarks/readme_table.py and commit the README"
    )


def test_peer_runs_fill_their_own_table():
    table = _readme_table()
    peers = table.peers_table_lines()
    fastres_rows = [line for line in peers if "| fastres[cpu] |" in line]
    # the "x onnxruntime" column: a measured speed-up on every fastres row
    assert fastres_rows and all(row.split("|")[9].strip() != "-" for row in fastres_rows)
    assert any("| onnxruntime |" in line for line in peers)
    assert not any("onnxruntime" in line for line in table.table_lines()[2:])


def test_cpu_inference_runs_fill_their_own_table():
    """Per CPU: float32 and bfloat16 rows, OpenVINO at its default precision among them, and a
    target verdict on each fastres bfloat16 row; a CPU with AMX among them."""
    table = _readme_table()
    folders = table.cpu_inference_folders()
    for folder in folders:
        rows = table.cpu_inference_table_lines(folder)[2:]
        assert any("| openvino | bf16 (default) |" in row for row in rows)
        fastres_bf16 = [row for row in rows if "| fastres[cpu] | bf16" in row]
        assert fastres_bf16 and all(("| met |" in r) or ("| not met |" in r) for r in fastres_bf16)
    assert any("AMX" in table.cpu_inference_setting(folder) for folder in folders)


def test_bn_act_runs_fill_their_own_table():
    """Per CPU: fastres's rows of every dtype's bn_act_shapes run, a verdict on each bfloat16
    row, and the instruction set the C++ kernels ran."""
    table = _readme_table()
    folders = table.bn_act_folders()
    assert folders
    section = table.bn_act_sections()
    setting_lines = [line for line in section if line.startswith("**")]
    assert len(setting_lines) == len(folders)
    assert all("C++ kernels" in line for line in setting_lines)
    bf16 = [line for line in section if line.startswith("| bf16 |")]
    assert bf16 and all(("| met |" in r) or ("| not met |" in r) for r in bf16)
