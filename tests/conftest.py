"""Shared fixtures: a tiny teacher and its cache on the synthetic dataset, made once.

The suite is CPU-only by design, also on a machine with GPUs: they are hidden
before anything touches CUDA (here and in every subprocess a test starts), so
that `--device auto` means the CPU, float32 and bit-exact reruns. The CUDA
paths (bf16 autocast, pinned copies) are checked by `make bench` on a GPU.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from kdpipe.cache import CHECKSUM_KEY, MANIFEST_KEY, manifest_checksum
from kdpipe.cli import main


def edit_manifest(store: Path, **changes: object) -> None:
    """Change manifest fields the way a tool would, updating the checksum beside it."""
    meta = json.loads((store / "zarr.json").read_text())
    data = meta["attributes"][MANIFEST_KEY]
    data.update(changes)
    meta["attributes"][CHECKSUM_KEY] = manifest_checksum(data)
    (store / "zarr.json").write_text(json.dumps(meta))


def invoke(*parts: str | Path) -> Result:
    """Run the kdpipe CLI in-process. Strings are split like a shell line; paths stay whole."""
    args = [a for p in parts for a in (shlex.split(p) if isinstance(p, str) else [str(p)])]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def cache(teacher: Path, out: Path | str, options: str = "--temperature 2") -> Result:
    """cache-teacher on the synthetic dataset (train split unless options say otherwise)."""
    return invoke("cache-teacher --data synthetic --teacher", teacher, "--out", out, options)


def student(soft_labels: Path | str, out: Path, options: str = "--alpha 0.5") -> Result:
    """A two-epoch kd_mlp_30x2 student on the synthetic dataset."""
    return invoke(
        "train-student --model kd_mlp_30x2 --data synthetic --epochs 2 --cache",
        soft_labels,
        "--out",
        out,
        options,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under ``folder``: what a refused command must leave unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fails(result: Result, message: str, code: int = 1) -> None:
    """A bad input's contract: a non-zero exit, the message, no traceback, one error line."""
    assert result.exit_code == code, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert sum(line.startswith("Error: ") for line in lines) == 1, result.output


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = invoke("train-teacher --model kd_cnn --data synthetic --epochs 2 --seed 0 --out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def train_cache(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "train.zarr"
    result = cache(teacher_run, out, "--split train --temperature 4 --chunk-size 128")
    assert result.exit_code == 0, result.output
    return out
