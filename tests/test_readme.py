"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer writes its checkpoint under the working directory
    block = next(b for b in python_blocks() if "Trainer(" in b and "BatchTopKSAE" in b)
    assert len(block.strip().splitlines()) <= 10
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["module"].global_step == 100
