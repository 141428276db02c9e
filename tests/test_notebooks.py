"""Every notebook in notebooks/ runs top to bottom cleanly, so none can rot.

The notebooks state their claims as ``assert`` lines: a claim that stops holding
fails the cell, and with it this test.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _stderr(output) -> str:
    return output.text if output.output_type == "stream" and output.name == "stderr" else ""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_cleanly_and_checks_its_claims(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert any("assert " in cell.source for cell in code), f"{path.name}: no claim is asserted"
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    # Every code cell ran, once, in order.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    for number, cell in enumerate(code, start=1):
        for output in cell.outputs:
            where = f"{path.name}, code cell {number}"
            assert output.output_type != "error", f"{where}: {output.ename}: {output.evalue}"
            text = _stderr(output)
            assert "Traceback" not in text and "Warning" not in text, f"{where}: {text}"
