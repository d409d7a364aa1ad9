"""gemma_mlx: Gemma 4 QAT checkpoints on MLX."""

from gemma_mlx import _platform  # noqa: F401  (must run before mlx is imported)

__version__ = "0.1.0"
