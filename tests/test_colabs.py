"""The notebooks in colabs/ run offline on a CPU: execute every code cell in order."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path("colabs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, digits_dir, monkeypatch):
    monkeypatch.setenv("MMJAX_DATA_DIR", digits_dir)
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    ns: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec"), ns)


def test_there_is_a_notebook():
    assert NOTEBOOKS
