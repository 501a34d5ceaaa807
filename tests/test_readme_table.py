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
    expected = table._replace_between(readme, table.START, table.END, table.table_lines())
    expected = table._replace_between(
        expected, table.PEERS_START, table.PEERS_END, table.peers_table_lines()
    )
    assert readme == expected, "run python benchmarks/readme_table.py and commit the README"


def test_peer_runs_fill_their_own_table():
    table = _readme_table()
    peers = table.peers_table_lines()
    fastres_rows = [line for line in peers if "| fastres[cpu] |" in line]
    # the "x onnxruntime" column: a measured speed-up on every fastres row
    assert fastres_rows and all(row.split("|")[8].strip() != "-" for row in fastres_rows)
    assert any("| onnxruntime |" in line for line in peers)
    assert not any("onnxruntime" in line for line in table.table_lines()[2:])
