"""The registry of tasks, by the name a config's `task` field uses."""

from ..task import Task
from .ar import AutoregressiveLM
from .dit import DiTGeneration
from .mdm import MaskedDiffusion
from .recurrent import RecurrentDepthLM
from .vit import ViTClassification

TASKS: dict[str, type[Task]] = {"vit": ViTClassification, "mdm": MaskedDiffusion, "dit": DiTGeneration,
                                "ar": AutoregressiveLM, "recurrent": RecurrentDepthLM}
