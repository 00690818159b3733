"""Shared fixtures: a tiny teacher and its cache on the synthetic dataset, made once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main


def invoke(*args: str) -> object:
    """Run the kdpipe CLI in-process; returns click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = invoke(
        "train-teacher",
        "--model",
        "kd_cnn",
        "--data",
        "synthetic",
        "--epochs",
        "2",
        "--seed",
        "0",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def train_cache(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "train.zarr"
    result = invoke(
        "cache-teacher",
        "--teacher",
        teacher_run,
        "--data",
        "synthetic",
        "--split",
        "train",
        "--temperature",
        "4",
        "--chunk-size",
        "128",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    return out
