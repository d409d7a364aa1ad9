"""gemma_mlx: Gemma 4 QAT checkpoints on MLX."""

import warnings

from gemma_mlx import _platform  # noqa: F401  (must run before mlx is imported)

# isort: split
# Imported eagerly so that `gemma_mlx.generate` is the function, not the module of the same name.
from gemma_mlx.batching.generate import batch_generate
from gemma_mlx.chat import ChatSession
from gemma_mlx.generate import GenerationResponse, generate, stream_generate
from gemma_mlx.hub import load

__version__ = "0.1.0"
__all__ = [
    "ChatSession",
    "GenerationResponse",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "stream_generate",
]

# `python -m gemma_mlx.generate` runs that module a second time, as __main__, after this package
# imported it above; harmless (as __main__ it only calls `gemma_mlx.cli.main`), so runpy's
# warning about it would only confuse users.
warnings.filterwarnings(
    "ignore", message=r"'gemma_mlx\.generate' found in sys\.modules", category=RuntimeWarning
)
