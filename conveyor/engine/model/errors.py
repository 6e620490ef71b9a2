"""The model layer's load errors, in a leaf module that the GGUF reader and checker both import."""


class UnsupportedGGUF(ValueError):
    """The file is not GGUF, or holds an architecture we do not run."""
