"""The one error type for bad user input; every layer raises it."""


class ConfigError(ValueError):
    """Bad user input (shape, preset, path). The message always names the fix."""
