"""The one error type of bad user input, shared by the config, the tasks and the CLI."""


class ConfigError(ValueError):
    """A bad configuration; the message is one line beginning with the field name."""


def raise_first(problems: list[tuple[bool, str]]) -> None:
    """Raises ConfigError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)


def one_of(field: str, value, choices) -> tuple[bool, str]:
    """(ok, message) for a field that must be one of `choices`."""
    return value in choices, f"{field}: expected one of {', '.join(choices)}, got {value!r}"


def layer_stack_problems(options) -> list[tuple[bool, str]]:
    """The checks of the transformer fields every task's options have (model.layers,
    model.width, model.heads, model.mlp_ratio), as (ok, message) pairs."""
    return [
        (options.layers >= 1, f"model.layers: expected at least 1, got {options.layers}"),
        (options.width >= 1 and options.heads >= 1 and options.width % options.heads == 0,
         f"model.width: expected a positive multiple of model.heads={options.heads}, got {options.width}"),
        (options.mlp_ratio >= 1, f"model.mlp_ratio: expected at least 1, got {options.mlp_ratio}"),
    ]
