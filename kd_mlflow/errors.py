"""The error of bad user input, in a module of its own: config, data, modes and tracking
raise it without importing one another (``from .config import ConfigError`` still works)."""


class ConfigError(ValueError):
    """Bad user input. The message names the problem and the fix, on one line."""
