"""notebooks/quickstart.ipynb executed top to bottom on the smoke variant (slow: about 3 minutes)."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, tiny_data, monkeypatch):
  del tiny_data
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  monkeypatch.setenv("MCAD_NOTEBOOK_VARIANT", "smoke")
  monkeypatch.setenv("MCAD_NOTEBOOK_WORKDIR", str(tmp_path / "nb"))
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "student_int8" in outputs and "rsum" in outputs  # The retrieval table.
  assert (tmp_path / "nb" / "curves.png").stat().st_size > 0
  pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if "image/png" in o.get("data", {})]
  assert len(pngs) >= 3  # Curves and two query grids.
  assert "cosine min" in outputs
