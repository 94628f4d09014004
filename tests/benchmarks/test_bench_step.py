"""The step benchmark's ``--quick`` mode runs end to end and writes its two result files."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_step.py"


def test_quick_mode_writes_json_and_markdown(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--quick", "--out", str(tmp_path), "--architectures", "batchtopk", "gated"]
    bench.main(argv)
    result = json.loads((tmp_path / "step.json").read_text())
    cases = [(row["architecture"], row["case"]) for row in result["rows"]]
    assert cases == [
        ("batchtopk", "no dead"),
        ("batchtopk", "AuxK"),
        ("gated", "L0≈k"),
        ("gated", "init"),
        ("topk", "MultiSAEModule, 4 hooks"),
    ]
    for row in result["rows"][:-1]:
        assert row["sae_lens_x"] > 0 and row["ours_x"] > 0 and row["load_1min"]
    multi = result["rows"][-1]
    assert multi["ours_x"] > 0 and multi["load_1min"] and multi["sae_lens_x"] is None
    assert [row["l0"] for row in result["rows"]][:2] == [4.0, 4.0]  # k = 4 in quick mode
    assert set(result["adam"][0]) == {"d_sae", "default", "foreach", "fused", "load_1min"}
    assert all(row["load_1min"] for row in result["adam"] + result["crossover"])
    assert [row["density"] for row in result["crossover"]] == [0.02, 0.05, 0.1, 0.2]
    table = (tmp_path / "step.md").read_text()
    assert "| batchtopk | AuxK | 256 |" in table and "load average" in table
    assert "| topk | MultiSAEModule, 4 hooks | 256 | – |" in table
