"""Where a model comes from: a directory, a `.gguf` file, or a Hugging Face repo id.

`load(path_or_repo)` resolves any of them to a model directory and loads it. A `.gguf` file is
converted once into the cache directory (`$GEMMA_MLX_CACHE`, else `$XDG_CACHE_HOME/gemma_mlx`, else
`~/.cache/gemma_mlx`) and reused while the file is unchanged; a repo id is downloaded with
huggingface_hub (or found in its local cache when offline). A GGUF repo (a name ending in "gguf",
or `REPO:FILE.gguf` to pick a file) gives its model GGUF and its `mmproj` GGUF (the vision and
audio towers, llama.cpp's format), which are converted together.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from gemma_mlx.builtin import builtin_gguf
from gemma_mlx.errors import GemmaMLXError, OptionError
from gemma_mlx.outputs import OutputExistsError, remove_stale_staging, staged_directory

CACHE_ENV = "GEMMA_MLX_CACHE"
# Files a model directory needs; weights in other formats (.bin, .pt, .gguf) are not fetched.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# `REPO:FILE` names one GGUF file of a repo.
_REPO_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[\w./-]+\.gguf)$")
# llama.cpp's name for a towers-only GGUF; of several, the first of these precisions is taken.
MMPROJ = "mmproj"
MMPROJ_PREFERENCE = ("bf16", "f32", "f16")


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


def converted_gguf(path: Path, progress: bool = True, mmproj: Path | None = None) -> Path:
    """The MLX directory converted from the GGUF file `path` (and the towers of `mmproj`, when
    given), converting it on first use.

    The conversion is staged beside the cache entry and committed when complete
    (`gemma_mlx.outputs.staged_directory`): an interrupted run leaves nothing behind, the next run
    removes the staging of one that was killed, and of two concurrent runs the first to finish
    wins while the other returns its result.
    """
    from gemma_mlx import convert

    # The converter's format version: an entry an older converter wrote is not reused.
    name = f"{path.stem}-{_gguf_fingerprint(path)}-v{convert.FORMAT_VERSION}"
    if mmproj is not None:
        name += f"-{MMPROJ}-{_gguf_fingerprint(mmproj)}"
    target = cache_dir() / "gguf" / name
    if (target / "config.json").is_file():
        return target

    remove_stale_staging(target.parent)
    incomplete = os.path.lexists(target)  # an entry someone damaged: replaced if we wrote it
    try:
        with staged_directory(target, force=incomplete, sources=(path,)) as staging:
            options = {} if mmproj is None else {"mmproj": mmproj}
            convert.convert_gguf(path, staging, progress=progress, **options)
    except OutputExistsError:
        if not (target / "config.json").is_file():  # not a concurrent run that finished first
            raise
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
        raise _not_found(repo_id, e) from e


def gguf_repo_files(repo_id: str, filename: str | None) -> tuple[Path, Path | None]:
    """(model GGUF, mmproj GGUF or None) of a GGUF repo: from huggingface_hub's cache when it
    holds the model file, else downloaded. `filename` picks the model file; without it the repo
    must hold one GGUF besides its mmproj files."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=["*.gguf"], local_files_only=True))
    except Exception:  # not cached
        local = None
    if local is not None:
        names = sorted(str(f.relative_to(local)) for f in local.rglob("*.gguf"))
        if filename in names if filename else _split_gguf(names)[0]:
            model, mmproj = pick_gguf_files(repo_id, names, filename)
            return local / model, None if mmproj is None else local / mmproj
    from huggingface_hub import HfApi, hf_hub_download

    try:
        names = [n for n in HfApi().list_repo_files(repo_id) if n.lower().endswith(".gguf")]
    except Exception as e:
        raise _not_found(repo_id, e) from e
    model, mmproj = pick_gguf_files(repo_id, names, filename)
    try:
        paths = [Path(hf_hub_download(repo_id, name)) for name in (model, mmproj) if name]
    except Exception as e:
        raise _not_found(repo_id, e) from e
    return paths[0], paths[1] if mmproj else None


def _split_gguf(names: list[str]) -> tuple[list[str], list[str]]:
    """(model files, mmproj files) among GGUF file names."""
    projectors = [n for n in names if MMPROJ in Path(n).name.lower()]
    return [n for n in names if n not in projectors], projectors


def pick_gguf_files(repo_id: str, names: list[str], filename: str | None) -> tuple[str, str | None]:
    """The model file (`filename`, or the repo's only non-mmproj GGUF) and the mmproj file among
    a repo's GGUF `names` (of several, the first precision in `MMPROJ_PREFERENCE`)."""
    models, projectors = _split_gguf(names)
    if filename is not None:
        if filename not in names:
            raise ModelNotFoundError(
                f"{repo_id}: has no file {filename} (its GGUF files: {', '.join(names) or 'none'})"
            )
        model = filename
    elif len(models) == 1:
        model = models[0]
    else:
        raise ModelNotFoundError(
            f"{repo_id}: holds {len(models)} model GGUF files ({', '.join(models) or 'none'}); "
            f"pick one with {repo_id}:FILE"
        )

    def preference(name: str) -> tuple[int, str]:
        lower = Path(name).name.lower()
        return next((i for i, p in enumerate(MMPROJ_PREFERENCE) if p in lower), 99), name

    return model, min(projectors, key=preference, default=None)


def _not_found(repo_id: str, error: Exception) -> ModelNotFoundError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelNotFoundError(
        f"cannot download '{repo_id}' from the Hugging Face Hub and it is not in the local "
        f"cache ({reason}); when offline, pass a local model directory or a .gguf file"
    )


def resolve_model(path_or_repo: str | Path | None, mmproj: str | Path | None = None) -> Path:
    """A model directory for a directory, a .gguf file, a repo id, or None (the built-in model).

    `mmproj`: llama.cpp's towers file of a .gguf model, converted with it (a directory or repo
    holds its own towers; a GGUF repo id brings its mmproj)."""
    if mmproj is not None:
        return _gguf_with_mmproj(path_or_repo, Path(mmproj).expanduser())
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
    text = str(path_or_repo)
    repo_file = _REPO_FILE.match(text)
    if repo_file or (_REPO_ID.match(text) and text.lower().endswith("gguf")):
        repo, filename = repo_file.groups() if repo_file else (text, None)
        model, mmproj = gguf_repo_files(repo, filename)
        return converted_gguf(model, mmproj=mmproj)
    if _REPO_ID.match(text) and not text.startswith((".", "~")):
        return download(text)
    raise ModelNotFoundError(
        f"{path_or_repo}: no such model directory, .gguf file or Hugging Face repo id"
    )


def _gguf_with_mmproj(path_or_repo: str | Path | None, mmproj: Path) -> Path:
    path = None if path_or_repo is None else Path(path_or_repo).expanduser()
    if path is None or path.suffix.lower() != ".gguf" or not path.is_file():
        raise OptionError(
            f"--mmproj {mmproj}: goes with a .gguf model file, got {path_or_repo or 'none'} (a "
            "model directory holds its own towers; a GGUF repo id brings its mmproj)"
        )
    if not mmproj.is_file():
        raise ModelNotFoundError(f"--mmproj {mmproj}: no such file")
    return converted_gguf(path, mmproj=mmproj)


def load(
    path_or_repo: str | Path | None = None,
    dtype: Any = None,
    dequantize: bool | None = None,
    media: bool | None = None,
    mmproj: str | Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a directory, a .gguf file, a Hugging Face repo id, or None for
    the built-in Gemma 3 270M. See `gemma_mlx.loading.load_model` for `dtype`/`dequantize`;
    `media`: a Gemma 4 checkpoint's vision and audio towers are loaded when it has them (None),
    required (True) or skipped to save their memory (False); `mmproj`: llama.cpp's towers file of
    a .gguf model (`resolve_model`). Under `mlx.launch` with several ranks, each rank loads its
    part of a pipeline (`gemma_mlx.distributed`, text only)."""
    from gemma_mlx.distributed import load_pipeline, pipeline_group
    from gemma_mlx.loading import load as load_directory
    from gemma_mlx.tokenizer import load_tokenizer

    group = pipeline_group()
    if group is None:
        return load_directory(
            resolve_model(path_or_repo, mmproj), dtype=dtype, dequantize=dequantize, media=media
        )
    if media:
        raise OptionError("images and audio are not available on a pipelined model (mlx.launch)")
    path = resolve_model(path_or_repo, mmproj)
    return load_pipeline(path, group, dtype, dequantize), load_tokenizer(path)
