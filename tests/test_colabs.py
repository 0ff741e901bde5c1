"""The notebooks in colabs/ run offline on a CPU, as `jupyter nbconvert --execute` runs them: every
code cell in order, in a Jupyter kernel whose working directory is the notebook's own folder.

A notebook's training loop is shortened here (`STEPS = N` → `STEPS = SHORT_STEPS`): this checks
that every cell runs against the current API, not how far the model gets (the notebook prints
that for a reader). The kernel reads its datasets from one data dir holding the built-in digits
and a test-sized `shapes` (the real one has 20,000 training scenes).
"""

import json
import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted(Path("colabs").glob("*.ipynb"))
# Above vit_quickstart's 30 warm-up steps; tokenizer_shapes starts its GAN at STEPS // 2, so the
# shortened run trains the discriminator too.
SHORT_STEPS = 40


def _code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.fixture(scope="module")
def notebook_data_dir(tmp_path_factory, small_shapes):
    """One TFDS data dir (MMJAX_DATA_DIR names one) with digits and a test-sized shapes, 32 px."""
    from mmjax.data.registry import ensure_prepared

    data_dir = ensure_prepared("digits", str(tmp_path_factory.mktemp("tfds_notebooks")))
    return small_shapes(data_dir, {"train": 400, "test": 50, "test_novel": 10})


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_a_kernel_from_its_own_folder(path, notebook_data_dir, monkeypatch):
    monkeypatch.setenv("MMJAX_DATA_DIR", notebook_data_dir)  # the kernel inherits the environment
    # ... but not the suite's XLA flags (tests/conftest.py): a reader's kernel has one CPU device,
    # not the 8 simulated ones the sharding tests need (the notebooks are 35% slower on 8), and
    # XLA's default level (a notebook runs more than it compiles: the tokenizer's LPIPS and GAN convs).
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                             if not f.startswith(("--xla_backend_optimization_level",
                                                                  "--xla_force_host_platform_device_count"))))
    nb = nbformat.read(path, as_version=4)
    shortened = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            source = re.sub(r"^STEPS = \d+$", f"STEPS = {SHORT_STEPS}", cell.source, flags=re.M)
            shortened |= source != cell.source
            cell.source = source
    assert shortened or not any("STEPS" in c for c in _code_cells(path))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent.absolute())}})
    client.execute()  # raises CellExecutionError naming the cell and the error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_installs_mmjax_first_only_in_colab(path):
    """The first code cell installs mmjax in Colab, and only there (a no-op locally and here)."""
    first = _code_cells(path)[0]
    assert "'google.colab' in sys.modules" in first or '"google.colab" in sys.modules' in first, first
    assert "pip" in first and "install" in first


def test_quickstart_prose_matches_its_config():
    """The text counts the tokens the config gives: a CLS token only if the experiment has one."""
    from mmjax.experiment import load_experiment
    nb = json.loads(Path("colabs/vit_quickstart.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    model = load_experiment("experiments/vit_digits.py").model
    assert model.pool == "gap" and model.posemb == "sincos2d"
    assert "16 patch tokens" in text and "+1 CLS" not in text, text
    assert "no CLS token" in text and 'pool="gap"' in text, text


def test_there_is_a_notebook():
    assert NOTEBOOKS
