"""Two DDP ranks (gloo, CPU): disjoint token shards covering the source, no hang, exact resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_ranks_read_disjoint_shards_and_resume_exactly(tmp_path):
    script = Path(__file__).with_name("ddp_shards.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in records] == [12, 12]
    rows = [set(r["rows"]) for r in records]
    assert all(len(r["rows"]) == len(set(r["rows"])) == 20 for r in records)
    assert rows[0].isdisjoint(rows[1])
    assert rows[0] | rows[1] == set(range(40))
    assert [(r["resumed_batches"], r["resumed_equal"]) for r in records] == [(8, True)] * 2
