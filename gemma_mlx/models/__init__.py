"""Architectures by `model_type` (config.json), mlx-lm style: each module has Model and ModelArgs."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from gemma_mlx.models import gemma3, gemma4, gemma4_assistant, gemma4_multimodal
from gemma_mlx.models.base import ConfigError

ARCHITECTURES: dict[str, ModuleType] = {
    "gemma3": gemma3,
    "gemma3_text": gemma3,
    "gemma4": gemma4,
    "gemma4_text": gemma4,
    "gemma4_unified": gemma4,  # the 12B: the same decoder, its vision is encoder-free
    "gemma4_unified_text": gemma4,
    "gemma4_assistant": gemma4_assistant,  # MTP drafters
    "gemma4_unified_assistant": gemma4_assistant,
}


def get_model_classes(config: dict[str, Any], media: bool = False) -> tuple[type, type]:
    """(Model, ModelArgs) for a config.json; unknown or missing `model_type` is a ConfigError.

    `media`: a Gemma 4 checkpoint with a vision or audio part gets its towers too
    (`gemma4_multimodal`); without it, and for other checkpoints, the text model.
    """
    if media and gemma4_multimodal.has_towers(config):
        return gemma4_multimodal.Model, gemma4_multimodal.MultimodalArgs
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json: required key 'model_type' is missing")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(
            f"config.json: unknown model_type {model_type!r} (supported: {supported})"
        )
    return arch.Model, arch.ModelArgs


__all__ = ["ARCHITECTURES", "ConfigError", "get_model_classes"]
