"""The registry of tasks, by the name a config's `task` field uses, and `task_class`, which
also resolves a task of your own named "module.path:ClassName" (docs/trainer.md, "Adding a task")."""

import dataclasses
import importlib
import os
import sys

from ..errors import ConfigError
from ..task import Task
from .ar import AutoregressiveLM
from .dit import DiTGeneration
from .mdm import MaskedDiffusion
from .recurrent import RecurrentDepthLM
from .vit import ViTClassification

TASKS: dict[str, type[Task]] = {"vit": ViTClassification, "mdm": MaskedDiffusion, "dit": DiTGeneration,
                                "ar": AutoregressiveLM, "recurrent": RecurrentDepthLM}

# What the trainer calls on a task (task.py); a class lacking one is not a task.
TASK_METHODS = ("train_batch", "block_loss", "end_to_end_loss", "no_weight_decay", "evaluate", "finish")


def task_class(name: str) -> type[Task]:
    """The class a config's `task` names: a key of TASKS, or "module.path:ClassName" naming a
    class of your own. The module is imported as `python -m` would find it: from sys.path,
    with the current directory appended to it if absent (so a file beside you works with the
    `diffusionblocks` command too). Raises ConfigError ("task: ...") when the name is
    unknown, the module does not import, the attribute is missing or is not a task class."""
    if name in TASKS:
        return TASKS[name]
    module_name, colon, attribute = name.partition(":")
    if not (colon and module_name and attribute):
        raise ConfigError(f"task: expected one of {', '.join(sorted(TASKS))}, or module:Class naming a task "
                          f"class of your own, got {name!r}")
    if module_name == "__main__":
        raise ConfigError(f"task: {name!r} names a class of the running script, which eval, sample, --resume "
                          "and block-parallel processes cannot import; name it by its module instead "
                          f"(for a script my_task.py beside you: 'my_task:{attribute}')")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        found = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name + ".").startswith(error.name + "."):  # it, or its package
            raise ConfigError(f"task: no module named {module_name!r} (for {name!r}); run from the folder that "
                              "holds it or put that folder on PYTHONPATH") from error
        raise ConfigError(f"task: importing module {module_name!r} failed: {error}") from error
    except Exception as error:  # the user's module raised while importing
        raise ConfigError(f"task: importing module {module_name!r} failed: {type(error).__name__}: {error}") \
            from error
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"task: module {module_name!r} has no attribute {attribute!r} (for {name!r})")
        found = getattr(found, part)
    missing = not_a_task(found)
    if missing:
        raise ConfigError(f"task: {name!r} is not a task class (missing: {', '.join(missing)}); "
                          "see diffusionblocks.Task")
    return found


def not_a_task(candidate) -> list[str]:
    """What `candidate` lacks to be a task class: a class with the methods of task.py, a
    `level_name`, and a `Config` dataclass with a `layers` field and a `check` method."""
    if not isinstance(candidate, type):
        return ["a class"]
    missing = [name for name in TASK_METHODS if not callable(getattr(candidate, name, None))]
    if not isinstance(getattr(candidate, "level_name", None), str):
        missing.append("level_name")
    options = getattr(candidate, "Config", None)
    if not (dataclasses.is_dataclass(options) and isinstance(options, type)):
        missing.append("Config (a dataclass)")
    else:
        if "layers" not in {f.name for f in dataclasses.fields(options)}:
            missing.append("Config.layers")
        if not callable(getattr(options, "check", None)):
            missing.append("Config.check")
    return missing


def task_presets(name: str) -> dict:
    """The presets a task names (name -> function returning TrainConfig fields; may be empty)."""
    return dict(getattr(task_class(name), "presets", None) or {})
