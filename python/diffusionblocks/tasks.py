"""The registry of tasks, by the name a config's `task` field uses."""

from .vit import ViTClassification

TASKS = {"vit": ViTClassification}
