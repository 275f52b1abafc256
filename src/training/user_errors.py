"""The errors a training run raises for what it was given (a config, a path, a checkpoint folder, a tracker), as
against a bug: the stage scripts print them as one line without a traceback (src/cli.py). A bare ValueError is
not among them, since deep in a model it usually means a bug whose traceback is wanted."""

from __future__ import annotations

from ..config import ConfigError
from ..data.image_folder import DatasetError
from ..models.diffusers_compat import DiffusersFormatError
from ..pipeline import PipelineError
from .checkpoint import CheckpointError, CheckpointWriteError
from .guard import NonFiniteLossError
from .init_unet import InitUNetError
from .latent_cache import LatentCacheError
from .stage2 import Stage2SetupError
from .trackers import TrackerChoiceError

TRAINING_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,  # a misspelt key, a value out of range (names the file and the key)
    DatasetError,  # a missing or empty dataset folder
    FileNotFoundError,  # a weights file, the Inception or VGG weights, a text encoder folder
    DiffusersFormatError, PipelineError, InitUNetError,  # a model file of the wrong kind
    CheckpointError, CheckpointWriteError,  # resume from a broken checkpoint, a fresh run over checkpoints, disk full
    LatentCacheError, Stage2SetupError, TrackerChoiceError,
    NonFiniteLossError,  # the guard's limit of non-finite steps in a row (the checkpoints stay)
)
