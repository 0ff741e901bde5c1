"""The notebooks in colabs/ run offline on a CPU: execute every code cell in order.

A notebook's training loop is shortened here (`STEPS = N` → `STEPS = SHORT_STEPS`): this checks
that every cell runs against the current API, not how far the model gets (the notebook prints
that for a reader).
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path("colabs").glob("*.ipynb"))
SHORT_STEPS = 40  # above the notebook's 30 warmup steps


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, digits_dir, monkeypatch):
    monkeypatch.setenv("MMJAX_DATA_DIR", digits_dir)
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    cells = [re.sub(r"^STEPS = \d+$", f"STEPS = {SHORT_STEPS}", c, flags=re.M) for c in cells]
    ns: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), ns)
    if "STEPS" in ns:
        assert ns["STEPS"] == SHORT_STEPS


def test_there_is_a_notebook():
    assert NOTEBOOKS
