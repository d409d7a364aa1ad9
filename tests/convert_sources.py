"""Tiny converter sources (a Q4_0 GGUF, a safetensors directory with its tokenizer) and helpers to
run the converter's command line in-process and to see what it left behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

from tiny_chat_model import write_model


def tiny_gguf(directory: Path) -> Path:
    """A Gemma 3 GGUF as llama.cpp writes it (built from a tiny transformers model)."""
    from gguf import GGMLQuantizationType
    from gguf_reference import gguf_variant, write_gguf
    from hf_reference import save_reference

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tiny.gguf"
    model = save_reference(gguf_variant("gemma3"), directory / "hf")
    write_gguf(model, path, GGMLQuantizationType.Q4_0)
    shutil.rmtree(directory / "hf")
    return path


def tiny_safetensors(directory: Path) -> Path:
    """An unquantized Gemma 3 checkpoint directory with its tokenizer (no torch needed)."""
    return write_model(directory)


def run_converter(*argv: str | Path) -> tuple[int, str]:
    """(exit status, stderr) of `gemma-mlx-convert argv`, run in this process."""
    from gemma_mlx.convert.__main__ import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            status = e.code
    return status, stderr.getvalue()


def staging_leftovers(directory: Path) -> list[str]:
    """Staging paths (`.<name>.partial-...`) anywhere under `directory`."""
    return sorted(str(p) for p in Path(directory).rglob("*.partial-*"))


def digest(path: Path) -> str:
    """A hash of a file, or of a directory's names and contents."""
    path = Path(path)
    h = hashlib.sha256()
    for item in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(item.relative_to(path.parent)).encode())
        if item.is_file():
            h.update(item.read_bytes())
    return h.hexdigest()
