"""The registry of tasks, by the name a config's `task` field uses."""

from .ar import AutoregressiveLM
from .dit import DiTGeneration
from .mdm import MaskedDiffusion
from .recurrent import RecurrentDepthLM
from .vit import ViTClassification

TASKS = {"vit": ViTClassification, "mdm": MaskedDiffusion, "dit": DiTGeneration,
         "ar": AutoregressiveLM, "recurrent": RecurrentDepthLM}
