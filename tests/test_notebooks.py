"""The notebooks run top to bottom in a Jupyter kernel (nbclient) on the built-in model, and their
outputs show what each section claims: streamed text, a chat session resumed from its file,
speculative output equal to plain greedy output, the converter's progress bar and report, a
converted model that generates the built-in model's text, and the benchmark charts."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 600


def execute(name: str):
    """The notebook after running every cell in a fresh kernel, from the notebooks folder."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    return notebook


def tagged(notebook, tag: str) -> list:
    """The outputs of the cells tagged `tag`."""
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return [output for cell in cells for output in cell.outputs]


def text(outputs) -> str:
    """What the outputs print: stdout/stderr streams and the plain-text form of displays."""
    parts = []
    for output in outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))  # rich's colours


def all_text(notebook) -> str:
    return text(o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "benchmarks.ipynb"])
def test_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert [c.id for c in code if c.outputs or c.execution_count is not None] == []


@pytest.mark.slow
@pytest.mark.real_model
def test_quickstart_runs_on_the_builtin_model():
    notebook = execute("quickstart.ipynb")

    streamed, _, stats = text(tagged(notebook, "stream")).rpartition("\n\n")
    assert re.search(r"\w", streamed), "the streamed text is empty"
    assert re.search(r"24 tokens at [\d.]+ tokens/s", stats)

    replies = text(tagged(notebook, "chat")).strip().splitlines()
    assert len(replies) == 2 and all(re.search(r"\w", r) for r in replies)

    session = text(tagged(notebook, "session"))
    reply, _, summary = session.rpartition("\n\n")
    assert re.search(r"\w", reply)
    held, prefilled = map(int, re.search(r"held (\d+) tokens.*prefilled (\d+)", summary).groups())
    assert 0 < prefilled < held  # the turn reused the saved cache

    speculative = text(tagged(notebook, "speculative"))
    assert "Identical to plain greedy decoding: True" in speculative
    accepted, proposed = map(int, re.search(r"accepted: (\d+) of (\d+)", speculative).groups())
    assert 0 < accepted <= proposed

    convert = tagged(notebook, "convert")
    # rich's progress bar renders as a live widget (not a warning that asks for ipywidgets)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in convert)
    assert "ipywidgets" not in all_text(notebook)
    summary = re.search(r"(\d+) tensors, .* (\d+) exact, (\d+) inexact", text(convert))
    tensors, exact, inexact = map(int, summary.groups())
    assert exact > 0 and exact + inexact == tensors

    # The converted directory generates what the built-in model (the same GGUF) streamed.
    converted = text(tagged(notebook, "converted")).strip().splitlines()[-1]
    assert re.search(r"\w", converted) and streamed.startswith(converted)


def test_benchmarks_notebook_draws_charts():
    from matplotlib.image import imread

    notebook = execute("benchmarks.ipynb")
    assert int(re.match(r"(\d+) records", text(tagged(notebook, "load"))).group(1)) > 0
    charts = [
        o.data["image/png"] for o in tagged(notebook, "chart") if "image/png" in o.get("data", {})
    ]
    chart_cells = [c for c in notebook.cells if "chart" in c.metadata.get("tags", [])]
    assert len(charts) == len(chart_cells)
    for png in charts:
        height, width, _ = imread(io.BytesIO(base64.b64decode(png)), format="png").shape
        assert height > 100 and width > 100
