"""Layout-free checkpoints: boxes of logical tensors in safetensors files with a JSON index (see `state.py`)."""
from megalite.checkpoint.state import (
    Loaded,
    TrainState,
    latest_iteration,
    load_checkpoint,
    read_logical_tensors,
    save_checkpoint,
)

__all__ = ["Loaded", "TrainState", "latest_iteration", "load_checkpoint", "read_logical_tensors", "save_checkpoint"]
