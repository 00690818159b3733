"""Small shared pieces: devices, software versions, output folders, the quiet log."""

from __future__ import annotations

import os
import platform
import signal
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.base.errors import UsageError
from kdpipe.base.outputs import RUN_DIR, Output, check_output, guard_output
from kdpipe.cache import Location

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("kdpipe", "torch", "timm", "zarr", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def prepare_output(
    path: str | Path | Location,
    overwrite: bool,
    inputs: Sequence[str | Path | Location | None] = (),
    kind: Output = RUN_DIR,
) -> None:
    """Ready ``path`` for a new ``kind`` (a run directory unless told): the one output
    guard, :func:`kdpipe.base.outputs.guard_output`, which refuses an existing output unless
    ``--overwrite`` and kdpipe made it, and always one that is, holds or lies inside an
    input or holds the working directory; call only once inputs are validated."""
    guard_output(path, kind, overwrite=overwrite, inputs=inputs)


def check_disjoint(
    output: str | Path | Location, inputs: Sequence[str | Path | Location | None]
) -> None:
    """An output that is an input, holds one or lies inside one, or holds the working
    directory, would destroy or change it: refused, naming both
    (:func:`kdpipe.base.outputs.check_output`)."""
    check_output(output, inputs)


def quiet(line: str) -> None:
    """The default log of library functions, and of every rank but 0 under torchrun: print
    nothing unless asked to."""


KILL_AFTER = "KDPIPE_TEST_KILL_AFTER"  # tests only: "chunks:N" or "epochs:N"


def kill_point(unit: str, done: int) -> None:
    """Where a test kills the process instead of racing it: with ``KDPIPE_TEST_KILL_AFTER``
    set to ``UNIT:N``, the process SIGKILLs itself once ``done`` (this process's durable
    chunks of ``cache-teacher``, or the epochs of ``train-student`` whose checkpoint is
    written) reaches N. A kill that lands at exactly N, whatever the machine's load, is what
    makes the resume tests deterministic; nothing outside the tests sets the variable."""
    wanted = os.environ.get(KILL_AFTER, "")
    if wanted and wanted.partition(":")[0] == unit and done >= int(wanted.partition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
