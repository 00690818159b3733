"""Epoch checkpoints, so that a killed training run resumes to the same final weights.

A checkpoint is everything the next epoch depends on: the model, the optimizer
state, the sampler's random generator, torch's global generator (dropout) and
the metrics rows so far. Tensors go to ``checkpoint-e<epoch>.safetensors``,
the rest to ``checkpoint.json``, written last through a rename: a kill between
the two leaves the previous, complete checkpoint in force. No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from kdpipe.base.errors import ManifestError, RunDirError, UsageError
from kdpipe.models.runs import CARD_FILE, cpu_state, write_json, write_safetensors
from torch import nn

STATE_FILE = "checkpoint.json"
BEST_FILE = "best.safetensors"  # early stopping: the best epoch's weights so far


def refuse_finished(run_dir: Path) -> None:
    """A run with its model card has nothing to resume (either task's ``--resume``)."""
    if (run_dir / CARD_FILE).is_file():
        raise UsageError(f"{run_dir} is finished (it has {CARD_FILE}): nothing to resume")


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    rows: list[dict],
) -> None:
    tensors = {f"model.{k}": v for k, v in cpu_state(model).items()}
    optimizer_state = optimizer.state_dict()
    scalars = {}
    for param_id, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    weights = f"checkpoint-e{epoch}.safetensors"
    write_safetensors(run_dir / weights, tensors)
    write_json(
        run_dir / STATE_FILE,
        {
            "epoch": epoch,
            "weights": weights,
            "param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
            "metrics": rows,
        },
    )
    for old in run_dir.glob("checkpoint-e*.safetensors"):
        if old.name != weights:
            old.unlink()


def load_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, list[dict]]:
    """Restore everything ``save_checkpoint`` saved; returns the epoch done and its rows."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} has no {STATE_FILE}: it stopped before its first epoch ended; "
            "start it again with --overwrite"
        )
    try:
        state = json.loads(path.read_text())
        tensors = safetensors.torch.load_file(str(run_dir / state["weights"]))
    except (json.JSONDecodeError, KeyError, OSError, safetensors.SafetensorError) as exc:
        raise ManifestError(f"{path} or its weights cannot be read ({exc!r})") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    entries: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            entries.setdefault(int(param_id), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        param_id, name = key.split(".", 1)
        entries.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["epoch"]), list(state["metrics"])


def save_best(run_dir: Path, model: nn.Module) -> None:
    """Keep the weights early stopping may return to (through a rename, like a checkpoint)."""
    write_safetensors(run_dir / BEST_FILE, cpu_state(model))


def load_best(run_dir: Path, model: nn.Module) -> None:
    path = run_dir / BEST_FILE
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise RunDirError(f"{path}: the best epoch's weights cannot be read ({exc!r})") from None
    model.load_state_dict(tensors)


def remove_checkpoint(run_dir: Path) -> None:
    """A finished run keeps its model, not its resume state."""
    for path in (
        run_dir / STATE_FILE,
        run_dir / BEST_FILE,
        *run_dir.glob("checkpoint-e*.safetensors"),
    ):
        path.unlink(missing_ok=True)
