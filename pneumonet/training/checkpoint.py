"""Training checkpoints: everything needed to continue a stage after its last finished epoch.

A checkpoint is a folder that Ray Train copies to the run storage after every epoch:

- ``state.json``: epoch counter, best-so-far validation ROC-AUC and its epoch, the history of every
  epoch, the epochs a restart continued after, and ``final`` (see below);
- ``weights.npz``: the current weights of the model the optimizer updates (for cached-feature
  transfer that is the head; the frozen backbone comes from ``model.weights`` again on restore);
- ``best.npz``: the best weights so far, so early stopping survives a restart;
- ``optimizer.npz``: the optimizer's variables (Adam moments, its iteration counter and, with
  float16, the loss scale), so a restart continues the same optimisation instead of a cold one.

The last checkpoint of a stage is ``final``: it holds ``model.keras``, the full float32 model with the
best weights, which the driver turns into the model artifact. Arrays are stored in the order of
``model.weights``/``optimizer.variables``, which the same builder reproduces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pneumonet.errors import ConfigError
from pneumonet.training.loop import FitState

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.npz"
BEST_FILE = "best.npz"
OPTIMIZER_FILE = "optimizer.npz"
FINAL_MODEL_FILE = "model.keras"


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    np.savez(path, *[np.asarray(array) for array in arrays])


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def save_checkpoint(folder: str | Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: FitState) -> None:
    """Write the training state of ``model`` (the trained part) and ``optimizer`` into ``folder``."""
    folder = Path(folder)
    _save_arrays(folder / WEIGHTS_FILE, model.get_weights())
    _save_arrays(folder / BEST_FILE, state.best_weights or model.get_weights())
    _save_arrays(folder / OPTIMIZER_FILE, [variable.numpy() for variable in optimizer.variables])
    (folder / STATE_FILE).write_text(json.dumps({**state.to_json(), "final": False}, indent=1))


def save_final(folder: str | Path, model: keras.Model, state: FitState) -> None:
    """The closing checkpoint: the full float32 model with the best weights, and the final state."""
    folder = Path(folder)
    model.save(folder / FINAL_MODEL_FILE)
    (folder / STATE_FILE).write_text(json.dumps({**state.to_json(), "final": True}, indent=1))


def read_state(folder: str | Path) -> tuple[FitState, bool]:
    """The state in a checkpoint and whether it is the final one."""
    data = json.loads((Path(folder) / STATE_FILE).read_text())
    return FitState.from_json(data), bool(data.get("final"))


@dataclass
class SavedTraining:
    """A non-final checkpoint read into memory: the worker reads it while Ray lends it the folder and
    restores it once its model and optimizer exist."""

    name: str
    state: FitState  # with the best weights
    weights: list[np.ndarray]
    slots: list[np.ndarray]  # the optimizer's variables

    def restore(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> FitState:
        """Load the weights and optimizer variables into a model and optimizer built as when it was
        written (same config); returns the state."""
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        expected = [tuple(w.shape) for w in model.weights]
        if [w.shape for w in self.weights] != expected or len(self.slots) != len(optimizer.variables):
            raise ConfigError(
                f"checkpoint {self.name} does not fit the model being trained ({len(self.weights)} weight arrays and "
                f"{len(self.slots)} optimizer variables, expected {len(expected)} and {len(optimizer.variables)}): "
                "was model.* changed since the run started? Start a new run instead of resuming."
            )
        model.set_weights(self.weights)
        for variable, value in zip(optimizer.variables, self.slots, strict=True):
            variable.assign(value)
        return self.state


def read_checkpoint(folder: str | Path) -> SavedTraining:
    """The training state of a (non-final) checkpoint folder, in memory."""
    folder = Path(folder)
    state, _ = read_state(folder)
    state.best_weights = _load_arrays(folder / BEST_FILE)
    return SavedTraining(folder.name, state, _load_arrays(folder / WEIGHTS_FILE), _load_arrays(folder / OPTIMIZER_FILE))
