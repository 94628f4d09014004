"""LMEvaluation under DDP: two gloo ranks split the held-out rows and sum their results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_evaluation.py"


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_all_rows(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "tokenizer"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank logs the same, reduced figures
    assert [entry["step"] for entry in ranks[0]] == [2, 3]
    distributed = ranks[0][-1]["metrics"]["blocks.1.hook_resid_post"]
    for name, value in json.loads((tmp_path / "single.json").read_text()).items():
        assert distributed[name] == pytest.approx(value, rel=1e-6), name
