"""Runs every notebook of ``notebooks/`` top to bottom at ``SIZE = "small"``.

Each notebook executes with nbclient in its own temporary working directory
(whatever it writes, ``runs/...``, stays there), with
``SOFIM_OPTAX_NOTEBOOK_SIZE=small`` and ``SOFIM_OPTAX_REPO`` pointing at this
checkout so that its setup cell can import ``experiments``. A failing cell
fails the test with the cell's traceback. All four notebooks read
Fashion-MNIST; where the files are absent (and no download is wanted) they
skip. Committed notebooks must carry no outputs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

# name -> per-notebook timeout in seconds (generous: the CPU may be shared; a
# quiet 2-core machine needs well under a minute for each).
NOTEBOOKS = {
    "01_quickstart": 420,
    "02_sofim_image_classification": 420,
    "03_fisher_approximation": 420,
    "04_autoencoder_second_order": 420,
}


@functools.lru_cache(maxsize=None)
def _fashion_mnist_missing() -> str | None:
    from experiments import datasets

    try:
        datasets.load_fashion_mnist(download=False, verify=False)
    except (FileNotFoundError, OSError, datasets.DatasetFormatError) as err:
        return f"Fashion-MNIST not available here ({err}); install Debian's dataset-fashion-mnist"
    return None


def test_notebooks_present_and_clean() -> None:
    """Every notebook exists, is valid, starts with an Open-in-Colab badge and has no outputs."""
    found = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "markdown"
        assert (
            f"colab.research.google.com/github/<org>/sofim_optax/blob/main/notebooks/{name}.ipynb"
            in first.source
        )
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name}: committed with outputs"
                assert cell.execution_count is None, f"{name}: committed with execution counts"
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert 'os.environ.get("SOFIM_OPTAX_NOTEBOOK_SIZE", "full")' in code
        assert "google.colab" in code and "SOFIM_OPTAX_REPO" in code


def _errors(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"{o.get('ename')}: {o.get('evalue')}")
    return out


@pytest.mark.slow
@pytest.mark.needs_data
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = _fashion_mnist_missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("SOFIM_OPTAX_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("SOFIM_OPTAX_REPO", str(ROOT))
    monkeypatch.delenv(
        "MPLBACKEND", raising=False
    )  # the kernel's inline backend, as in Jupyter / Colab
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=NOTEBOOKS[name],
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell failed\n{err}")
    assert not _errors(nb)
    # It plotted inline (a PNG in some output) and left its files in the temporary folder.
    pngs = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert pngs, f"{name}: no inline figure"
    if name in (
        "02_sofim_image_classification",
        "03_fisher_approximation",
    ):  # through the harness's CLIs
        written = [p for p in (tmp_path / "runs").rglob("*.json")]
        assert written, f"{name}: wrote no results under runs/"
