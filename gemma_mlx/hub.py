"""Where a model comes from: a directory, a `.gguf` file, or a Hugging Face repo id.

`load(path_or_repo)` resolves any of them to a model directory and loads it. A `.gguf` file is
converted once into the cache directory (`$GEMMA_MLX_CACHE`, else `$XDG_CACHE_HOME/gemma_mlx`, else
`~/.cache/gemma_mlx`) and
reused while the file is unchanged; a repo id is downloaded with huggingface_hub (or found in its
local cache when offline).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gemma_mlx.builtin import builtin_gguf
from gemma_mlx.errors import GemmaMLXError

CACHE_ENV = "GEMMA_MLX_CACHE"
# Files a model directory needs; weights in other formats (.bin, .pt, .gguf) are not fetched.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(GemmaMLXError, FileNotFoundError):
    """A model argument that is no directory, no .gguf file and no reachable repo id."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma_mlx"


def _gguf_fingerprint(path: Path) -> str:
    """Identifies a GGUF file's content cheaply: its path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def converted_gguf(path: Path, progress: bool = True) -> Path:
    """The MLX directory converted from the GGUF file `path`, converting it on first use.

    The conversion is written to a temporary directory beside the cache entry and renamed into
    place when complete, so an interrupted run leaves nothing half-written behind.
    """
    target = cache_dir() / "gguf" / f"{path.stem}-{_gguf_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    from gemma_mlx.convert import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf(path, staging, progress=progress)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download(repo_id: str) -> Path:
    """The local snapshot of `repo_id`: from huggingface_hub's cache, else downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True)
        )
    except Exception:  # not cached: fall through to the download
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"cannot download '{repo_id}' from the Hugging Face Hub and it is not in the local "
            f"cache ({reason}); when offline, pass a local model directory or a .gguf file"
        ) from e


def resolve_model(path_or_repo: str | Path | None) -> Path:
    """A model directory for a directory, a .gguf file, a repo id, or None (the built-in model)."""
    if path_or_repo is None:
        return converted_gguf(builtin_gguf())
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return converted_gguf(path)
        raise ModelNotFoundError(
            f"{path}: not a model directory or .gguf file (pass the directory that holds "
            "config.json and the weights)"
        )
    if _REPO_ID.match(str(path_or_repo)) and not str(path_or_repo).startswith((".", "~")):
        return download(str(path_or_repo))
    raise ModelNotFoundError(
        f"{path_or_repo}: no such model directory, .gguf file or Hugging Face repo id"
    )


def load(
    path_or_repo: str | Path | None = None,
    dtype: Any = None,
    dequantize: bool | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a directory, a .gguf file, a Hugging Face repo id, or None for
    the built-in Gemma 3 270M. See `gemma_mlx.loading.load_model` for `dtype`/`dequantize`."""
    from gemma_mlx.loading import load as load_directory

    return load_directory(resolve_model(path_or_repo), dtype=dtype, dequantize=dequantize)
