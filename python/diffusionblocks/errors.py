"""The one error type of bad user input, shared by the config, the tasks and the CLI."""


class ConfigError(ValueError):
    """A bad configuration; the message is one line beginning with the field name."""
