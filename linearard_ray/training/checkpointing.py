"""Training checkpoints: trainable weights, optimizer, scheduler, RNG of every rank, and the
counters that make a resumed run continue exactly where it stopped (step, tokens, data position).

Everything is written by rank 0 into one directory that Ray Train then persists. Tensors go
through ``torch.save`` and are read back with ``weights_only=True``; RNG states are converted to
plain lists first so that no pickled objects are needed.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linearard_ray.data.streams import StreamPosition

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    total_steps: int = 0
    world_size: int = 1
    data: StreamPosition = field(default_factory=StreamPosition)
    lm_data: StreamPosition | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        d["data"] = StreamPosition(**d.get("data", {}))
        if d.get("lm_data") is not None:
            d["lm_data"] = StreamPosition(**d["lm_data"])
        return cls(**d)


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device) as plain data."""
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return out


def restore_rng(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible devices: restore what overlaps
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    directory: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    rng_states: list[dict[str, Any]],
    state: TrainState,
) -> Path:
    """Write one checkpoint into ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, d / TRAINABLE_FILE)
    torch.save(_to_cpu(optimizer_state), d / OPTIMIZER_FILE)
    torch.save(scheduler_state, d / SCHEDULER_FILE)
    torch.save(rng_states, d / RNG_FILE)
    # state.json last: its presence marks a complete checkpoint.
    (d / STATE_FILE).write_text(state.to_json())
    return d


@dataclass
class LoadedCheckpoint:
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng_states: list[dict[str, Any]]
    state: TrainState


def load_checkpoint(directory: str | Path) -> LoadedCheckpoint:
    d = Path(directory)
    missing = [
        f for f in (STATE_FILE, TRAINABLE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE) if not (d / f).exists()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {d} is incomplete: missing {missing}")
    return LoadedCheckpoint(
        trainable=torch.load(d / TRAINABLE_FILE, map_location="cpu", weights_only=True),
        optimizer_state=torch.load(d / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        scheduler_state=torch.load(d / SCHEDULER_FILE, map_location="cpu", weights_only=True),
        rng_states=torch.load(d / RNG_FILE, map_location="cpu", weights_only=True),
        state=TrainState.from_json((d / STATE_FILE).read_text()),
    )


def read_state(directory: str | Path) -> TrainState:
    return TrainState.from_json((Path(directory) / STATE_FILE).read_text())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
