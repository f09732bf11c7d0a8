"""The example notebooks run end to end, each in a fresh ``python3`` kernel.

Each notebook's last cell asserts what it teaches (a loss went down, a
reconstruction beats the untrained model's, shapes as documented), so a
notebook that runs is a notebook that still works. They run as a user runs
them: one CPU device, in a scratch directory, on the embedded datasets.
"""

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOKS = ("01_compose_clip.ipynb", "02_mae_digits.ipynb", "03_gpt_text.ipynb",
             "04_hf_continue.ipynb", "05_visual_tokens.ipynb", "06_unified.ipynb")
CELL_TIMEOUT_S = 120  # a whole notebook takes well under a minute on a laptop CPU


def test_the_notebooks_are_committed_without_outputs():
  assert sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".ipynb")) == list(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3", name
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: clear the outputs before committing (Jupyter: Edit > Clear All Outputs)")
    assert "assert" in nb.cells[-1].source, f"{name}: the last cell must assert what it teaches"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
  nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices: a user has one
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  env["TMPDIR"] = str(tmp_path)  # fit()'s default workdirs land in the test's directory
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError with the cell's traceback
  elapsed = time.perf_counter() - start
  last = nb.cells[-1]
  assert any("ok" in out.get("text", "") for out in last.outputs), last.outputs
  print(f"{name}: {elapsed:.1f}s")
