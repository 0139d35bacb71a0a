"""The Colab notebooks run top to bottom, headless, on tiny settings."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, overrides):
    path = os.path.join(ROOT, "colab", name)
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # committed clean, so diffs show code, not outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, f"{name} needs one cell tagged 'parameters'"
    parameters[0].source += "\n# test overrides\n" + "\n".join(
        f"{key} = {value!r}" for key, value in overrides.items())
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return notebook


def _outputs(notebook):
    text, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output["text"])
            images += "image/png" in output.get("data", {})
    return "".join(text), images


def test_quickstart_notebook_runs(tmp_path):
    # Run in colab/ of this checkout, as a person running it in a clone would; the package is
    # installed already, so nothing is fetched.
    notebook = _run("quickstart.ipynb", {
        "WORKDIR": str(tmp_path / "run"), "NUM_STEPS": 4, "BATCH_SIZE": 8, "RESOLUTION": 16,
        "CHANNELS": 16, "NUM_RES_BLOCKS": 1})
    text, images = _outputs(notebook)
    assert "step 4/4" in text
    assert "finished at step 4" in text
    assert images == 4 + 3 + 4  # samplers, step counts, guidance scales
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
