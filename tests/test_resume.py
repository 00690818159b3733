"""cache-teacher killed with SIGKILL at random points resumes to byte-identical arrays."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from conftest import cache, edit_manifest

from pipeline.cache import load_soft_labels, read_manifest


def command(teacher: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--data",
        "synthetic",
        "--teacher",
        str(teacher),
        "--temperature",
        "3",
        "--chunk-size",
        "8",
        "--batch-size",
        "8",
        "--out",
        str(out),
    ]


def flagged(out: Path) -> int:
    """How many chunks the store has flagged as durable."""
    folder = out / "progress" / "c"
    return sum(1 for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else 0


def chunk_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for name in ("logprobs", "labels")
        for p in sorted((out / name / "c").rglob("*"))
        if p.is_file() and not p.name.endswith(".partial")
    }


def kill_when(process: subprocess.Popen, out: Path, target: int, deadline: float) -> bool:
    """SIGKILL once ``target`` chunks are flagged; False if the run ended first."""
    while process.poll() is None and time.monotonic() < deadline:
        if flagged(out) >= target:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def test_sigkill_at_random_points_then_resume(teacher_run: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.zarr"
    subprocess.run(command(teacher_run, reference), check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    rng = random.Random(20261123)
    kills, kept = 0, {}
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(4):
        target = flagged(out) + rng.randint(1, 15)
        process = subprocess.Popen(
            command(teacher_run, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        if not kill_when(process, out, target, time.monotonic() + 120):
            break
        kills += 1
        status = json.loads((out / "zarr.json").read_text())["attributes"]["kdpipe"]["status"]
        assert status == "writing"
        # what is flagged now must never be written again: remember each file's identity
        for name, index in ((n, i) for n in ("logprobs", "labels") for i in range(flagged(out))):
            key = f"{index}/0/0" if name == "logprobs" else f"{index}"
            stat = (out / name / "c" / key).stat()
            kept[(name, key)] = (stat.st_ino, stat.st_mtime_ns)
    assert kills >= 3, "the pass finished before it could be killed several times"
    final = subprocess.run(command(teacher_run, out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stdout + final.stderr
    assert chunk_files(out) == chunk_files(reference)  # byte-identical chunks
    assert np.array_equal(
        zarr.open_array(str(out / "logprobs"))[:], zarr.open_array(str(reference / "logprobs"))[:]
    )
    assert load_soft_labels(out).manifest.status == "complete"
    for (name, key), identity in kept.items():
        stat = (out / name / "c" / key).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, f"{name}/{key} was recomputed"


def test_partial_store_with_other_arguments_is_refused(train_cache: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.zarr"
    shutil.copytree(train_cache, partial)
    edit_manifest(partial, status="writing")
    before = chunk_files(partial)
    teacher = Path(read_manifest(partial).teachers[0].run_dir)
    result = cache(teacher, partial, "--split train --temperature 3 --chunk-size 128")
    assert result.exit_code == 1
    assert "holds a cache made with other arguments (temperature 4.0 != 3.0)" in result.output
    result = cache(teacher, partial, "--split test --temperature 4 --chunk-size 64")
    assert "data synthetic train != synthetic test; chunk_size 128 != 64" in result.output
    assert chunk_files(partial) == before
    replaced = cache(teacher, partial, "--temperature 3 --chunk-size 128 --overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert load_soft_labels(partial).manifest.temperature == 3.0


def test_complete_cache_with_same_arguments_is_left_alone(
    train_cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "done.zarr"
    shutil.copytree(train_cache, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    teacher = Path(load_soft_labels(copy).manifest.teachers[0].run_dir)
    result = cache(teacher, copy, "--split train --temperature 4 --chunk-size 128")
    assert result.exit_code == 0 and "already complete" in result.output
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


def test_a_deleted_finished_chunk_is_written_again(train_cache: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.zarr"
    shutil.copytree(train_cache, partial)
    edit_manifest(partial, status="writing")
    reference = chunk_files(train_cache)
    (partial / "logprobs" / "c" / "3" / "0" / "0").unlink()
    teacher = Path(read_manifest(partial).teachers[0].run_dir)
    result = cache(teacher, partial, "--split train --temperature 4 --chunk-size 128")
    assert result.exit_code == 0, result.output
    assert "resuming, 4 of 5 chunks already written" in result.output
    assert chunk_files(partial) == reference
