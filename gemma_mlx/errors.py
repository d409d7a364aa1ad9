"""Errors a user can act on. The CLI prints their message on one line and exits with status 2."""


class GemmaMLXError(Exception):
    """Base class: the message names the file, tensor, key or option at fault."""


class ConfigError(GemmaMLXError, ValueError):
    """A config.json that cannot describe a supported model."""


class WeightsError(GemmaMLXError, ValueError):
    """Missing, truncated or mis-shaped weight files."""


class ModelTooLargeError(GemmaMLXError, MemoryError):
    """The model would not fit in this machine's memory."""


class PromptError(GemmaMLXError, ValueError):
    """An empty prompt, or one the model's context cannot hold."""


class OptionError(GemmaMLXError, ValueError):
    """A generation option outside its valid range; the message names the option."""


class OptionTypeError(OptionError, TypeError):
    """A generation option of the wrong type (a string where a number belongs, an unknown name)."""


class MediaError(GemmaMLXError, ValueError):
    """An image or audio input that cannot be used: unreadable, corrupt, unsupported, too large
    or too long, or given to a checkpoint without the tower it needs."""
