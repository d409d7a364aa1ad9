"""Converters from QAT checkpoint formats to MLX."""
