"""``benchmarks/pareto.py --quick`` runs end to end (both data sets, the claims, the plots)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "pareto.py"


def load_script():
    spec = importlib.util.spec_from_file_location("pareto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_quick_frontier_and_target_check(tmp_path: Path):
    pareto = load_script()
    common = ["--quick", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    pareto.main([*common, "--output-dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "pareto.json").read_text())
    for dataset, data in result["datasets"].items():
        architectures = {run["architecture"] for run in data["runs"]}
        assert architectures == set(pareto.ARCHITECTURES), dataset
        assert len(data["runs"]) == 3 * len(architectures)
        assert (tmp_path / "out" / f"pareto_{dataset}.png").stat().st_size > 0
    assert "absorption" in result["datasets"]["synthetic"]["runs"][0]
    # The SmolLM2 SAEs spliced into the model: CE loss recovered between zero-ablation and clean.
    smollm2 = result["datasets"]["smollm2"]
    for run in smollm2["runs"]:
        assert math.isfinite(run["ce_loss_recovered"]) and run["ce_loss_recovered"] < 1.0, run
        assert math.isfinite(run["kl_score"]), run
    assert "ce_loss_recovered" in smollm2["matched"]
    assert [claim["source"] for claim in result["claims"]] == [
        "BatchTopK paper",
        "JumpReLU paper",
        "ATM paper",
    ]
    assert "## The papers' claims" in (tmp_path / "out" / "pareto.md").read_text()

    pareto.main([*common, "--output-dir", str(tmp_path / "out"), "--target-check"])
    check = json.loads((tmp_path / "out" / "target_l0.json").read_text())
    assert check["target_l0"] == 32 and check["window_l0"]


def test_interpolation_is_linear_in_log_l0_and_never_extrapolates():
    pareto = load_script()
    runs = [{"l0": 2.0, "nmse": 0.4}, {"l0": 8.0, "nmse": 0.2}]
    assert pareto.interpolate(runs, "nmse", 4.0) == pytest.approx(0.3)
    assert pareto.interpolate(runs, "nmse", 1.0) is None
    assert pareto.interpolate(runs, "nmse", 9.0) is None
    # A level within RANGE_TOLERANCE of an end takes that end's value (a run at 7.9 for 8).
    assert pareto.interpolate(runs, "nmse", 8.0 * (1 + pareto.RANGE_TOLERANCE)) == 0.2
    assert pareto.interpolate(runs, "nmse", 2.0 / (1 + pareto.RANGE_TOLERANCE)) == 0.4


def test_claims_are_judged_on_every_matched_point():
    pareto = load_script()
    levels = {"2": 0.5, "4": 0.4}
    table = {name: dict(levels) for name in pareto.ARCHITECTURES}
    table["batchtopk"] = {"2": 0.4, "4": 0.3}  # better than topk everywhere
    table["jumprelu"] = {"2": 0.6, "4": 0.3}  # worse at one point, better at the other
    table["atm"] = {"2": None, "4": None}
    tables = {dataset: {"nmse": table, "absorption": table} for dataset in ("synthetic", "smollm2")}
    verdicts = {v["source"]: v["verdict"] for v in pareto.judge(tables)}
    assert verdicts["BatchTopK paper"] == "holds"
    assert verdicts["JumpReLU paper"].startswith("inconclusive (holds at")
    assert verdicts["ATM paper"] == "inconclusive (no matched L0)"
    table["batchtopk"] = {"2": 0.6, "4": 0.5}
    assert pareto.judge(tables)[0]["verdict"] == "does not hold here"
    # A run that has finished only its first data set is judged on that one.
    partial = pareto.judge({"synthetic": tables["synthetic"]})
    assert {c["dataset"] for v in partial for c in v["comparisons"]} == {"synthetic"}
