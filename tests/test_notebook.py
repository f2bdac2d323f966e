"""notebooks/quickstart.ipynb: the offline part runs top to bottom (nbclient) and shows its results."""

import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_quickstart_notebook_offline_part_runs(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    offline = [c for c in nb.cells if "colab" not in c.metadata.get("tags", [])]
    assert len(offline) < len(nb.cells)  # the Colab cells exist and are marked
    nb.cells = offline
    monkeypatch.setenv("TFTRANSFER_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TFTRANSFER_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "validation: label: accuracy=" in text  # tftransfer.evaluate ran
    assert "SavedModel predictions:" in text and "predicted" in text
    assert "Transfer gain at k=2" in text  # tftransfer.compare ran
    assert len(images) >= 4  # confusion matrix, reliability, learning curves, data efficiency
    assert os.path.isdir(tmp_path / "runs" / "transfer" / "export" / "1")
