"""What a training checkpoint carries so that a resumed run continues exactly: where training
stands (``Progress``) and the random number streams.

``last.pth``'s ``train_state`` holds the fields of ``Progress`` and, beside them, the stage
index, iterations per epoch, optimizer / loss-scaler / proposal-network states, the RNG states
(``rng_state``), the resolved config, and under "hooks" each hook's ``state_dict()`` by class
name (``hook_states`` reads it, also from checkpoints written before hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..weights.checkpoint import read_file


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint's ``train_state``."""

    epoch: int = 0  # next epoch to run (0-based, over all stages)
    batch: int = 0  # batches of that epoch already done
    iteration: int = 0  # optimizer steps done in all
    history: list = dataclasses.field(default_factory=list)  # epoch summaries
    epoch_loss: float = 0.0  # sum of the training loss over the batches of this epoch done so far
    epoch_steps: int = 0  # those batches (a resumed epoch reports its loss over all of them)
    stage_iters: list = dataclasses.field(
        default_factory=list
    )  # iterations of each stage, fitted to solver.max_minutes ([] = as planned)
    fit_anchor: list = dataclasses.field(
        default_factory=list
    )  # [stage, iteration, position]: where the fitted learning-rate curve starts

    def advance(self, loss: float) -> None:
        """One training step done, with training loss ``loss``."""
        self.iteration += 1
        self.batch += 1
        self.epoch_loss += loss
        self.epoch_steps += 1

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def hook_states(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each hook's saved state by class name. A checkpoint written before the hooks kept the
    same values among its own fields: they are handed to the hooks that hold them now."""
    if "hooks" in state:
        return state["hooks"]
    return {
        "Validation": {"best_metric": state["best_metric"], "best_epoch": state["best_epoch"]},
        # bad_evals counted in the checkpoint's stage, against the run's best
        "EarlyStopping": {
            "best": state["best_metric"],
            "best_epoch": state["best_epoch"],
            "bad_evals": state["bad_evals"],
            "stage": state["stage"],
        },
        "RunOutput": {"metrics_bytes": state["metrics_bytes"]},
    }


def read_train_state(out_dir: Path, resume: bool, exist_ok: bool, suffix: str = ".pth") -> dict[str, Any] | None:
    """The checkpoint ``out_dir/last.pth`` (``last.safetensors`` with that ``suffix``) to resume
    from (with ``resume``), else None.

    Raises ``ConfigError`` when there is nothing to resume, or when a fresh run would replace a
    run already in ``out_dir`` without ``exist_ok``.
    """
    last = out_dir / f"last{suffix}"
    if resume:
        saved = read_file(last) if last.is_file() else None
        if saved is None or "train_state" not in saved:
            raise ConfigError(f"nothing to resume: {last} is missing or holds no training state")
        return saved
    earlier = [p for p in (out_dir / "last.pth", out_dir / "last.safetensors") if p.exists()]  # either format
    if earlier and not exist_ok:
        raise ConfigError(
            f"{out_dir} already holds a run ({earlier[0].name}); use --resume to continue it, "
            f"exist_ok=true to start it afresh, or another out_dir=..."
        )
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from (the model's sampling: torch; the random
    training scale: Python), as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Validation samples anchors and RoIs for its losses; keep that off the training streams."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
