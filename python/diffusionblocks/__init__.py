"""DiffusionBlocks trainer: residual networks trained block by block as denoisers
(Shing et al., arXiv 2506.14202). The hot ops come from diffusionblocks_ext.

The public API, for training a task of your own without editing the package
(docs/trainer.md, "Adding a task"; examples/user_task.py):

- `Trainer(config, out_dir).run()`: the one training loop, block-wise or end to end.
- `TrainConfig`, `preset`, `override`, `validate`: a run's config; `config.task` is a
  registered task or "module.path:ClassName", a class of your own.
- `Task` (the interface a task implements), `SampleRequest`, `BlockPartition` (the `plan`
  a task receives), `shared_parameters`, `device_of`.
- `ConfigError` (bad input; one line naming the field), `TrainingError` (a run that
  cannot go on).
- `load(run_dir)`: a trained run's model, ready to evaluate.
- Building blocks for a task's model and inference: `LevelEmbedder`, `AdaptiveNorm`,
  `zero_init_modulation` (adaLN-Zero conditioning on the noise level), `denoise_chain`,
  `expected_embedding` (the Euler chain over the blocks)."""

from diffusionblocks_ext import __version__

from .config import TrainConfig, override, preset, validate
from .errors import ConfigError
from .inference import load
from .partition import BlockPartition
from .sampler import denoise_chain, expected_embedding
from .task import SampleRequest, Task, device_of, shared_parameters
from .tasks.layers import AdaptiveNorm, LevelEmbedder, zero_init_modulation
from .train import Trainer, TrainingError

__all__ = [
    "Trainer", "TrainConfig", "preset", "override", "validate", "Task", "SampleRequest", "BlockPartition",
    "ConfigError", "TrainingError", "shared_parameters", "device_of", "load",
    "LevelEmbedder", "AdaptiveNorm", "zero_init_modulation", "denoise_chain", "expected_embedding",
]
