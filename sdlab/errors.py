"""The exceptions sdlab raises for bad input. Each message says what is wrong, where, and what would be valid."""


class SdlabError(Exception):
    """Base class of every error sdlab raises on purpose."""


class CheckpointError(SdlabError, ValueError):
    """A model file or folder is missing, unreadable, corrupted, unsafe, or of an unknown architecture."""


class TokenizerError(SdlabError, ValueError):
    """A tokenizer folder is incomplete or a vocabulary file is malformed."""


class ParameterError(SdlabError, ValueError):
    """A generation or training parameter is out of range (width, steps, strength, sampler name, ...)."""
