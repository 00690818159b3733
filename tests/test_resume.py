"""cache-teacher killed with SIGKILL at random points resumes to byte-identical arrays."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cache, edit_manifest
from kdpipe.cache import load_soft_labels, read_manifest


def command(teacher: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdpipe",
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


def killed_after(args: list[str], unit: str, count: int) -> subprocess.CompletedProcess:
    """Run ``args`` to be SIGKILLed by the process itself at the moment ``count`` chunks (or
    epochs) of this run are durable: the ``KDPIPE_TEST_KILL_AFTER`` hook, so the kill lands
    at the same point however loaded the machine is (watching from outside raced it)."""
    environment = {**os.environ, "KDPIPE_TEST_KILL_AFTER": f"{unit}:{count}"}
    result = subprocess.run(args, capture_output=True, text=True, env=environment)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    return result


def test_sigkill_at_random_points_then_resume(teacher_run: Path, tmp_path: Path) -> None:
    """75 chunks, killed four times after 1..15 more durable chunks each, then resumed."""
    reference = tmp_path / "reference.zarr"
    subprocess.run(command(teacher_run, reference), check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    rng = random.Random(20261123)
    kept = {}
    for _ in range(4):
        before, more = flagged(out), rng.randint(1, 15)
        killed_after(command(teacher_run, out), "chunks", more)
        assert flagged(out) == before + more  # exactly the chunks written before the kill
        status = json.loads((out / "zarr.json").read_text())["attributes"]["kdpipe"]["status"]
        assert status == "writing"
        # what is flagged now must never be written again: remember each file's identity
        for name, index in ((n, i) for n in ("logprobs", "labels") for i in range(flagged(out))):
            key = f"{index}/0/0" if name == "logprobs" else f"{index}"
            stat = (out / name / "c" / key).stat()
            kept[(name, key)] = (stat.st_ino, stat.st_mtime_ns)
    done = flagged(out)
    final = subprocess.run(command(teacher_run, out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert f"resuming, {done} of 75 chunks already written" in final.stdout + final.stderr
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


def student_command(cache_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdpipe",
        "train-student",
        "--model",
        "kd_cnn",
        "--data",
        "synthetic",
        "--cache",
        str(cache_path),
        "--alpha",
        "0.5",
        "--epochs",
        "30",
        "--seed",
        "5",
        "--dropout",
        "0.3",
        "--jitter",
        "1",
        "--batch-size",
        "64",
    ]


def checkpoint_epoch(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_train_student_killed_then_resumed_matches_uninterrupted(
    train_cache: Path, tmp_path: Path
) -> None:
    import pandas as pd
    from kdpipe.models.runs import read_card

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(
        [*student_command(train_cache), "--out", str(reference)], check=True, capture_output=True
    )
    target = random.Random(7).randint(2, 12)
    killed_after([*student_command(train_cache), "--out", str(killed)], "epochs", target)
    assert checkpoint_epoch(killed) == target
    assert not (killed / "model.json").exists(), "training finished before the kill"
    resumed = subprocess.run(
        [sys.executable, "-m", "kdpipe", "train-student", "--resume", str(killed)],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    assert read_card(killed).weights_sha256 == read_card(reference).weights_sha256
    ours, theirs = (
        pd.read_csv(r / "metrics.csv").drop(columns="seconds") for r in (killed, reference)
    )
    pd.testing.assert_frame_equal(ours, theirs)
    assert not list(killed.glob("checkpoint*"))


def test_resume_errors(train_cache: Path, tmp_path: Path) -> None:
    from conftest import invoke, student

    assert student(train_cache, tmp_path / "done").exit_code == 0
    result = invoke("train-student --resume", tmp_path / "done")
    assert (
        result.exit_code == 1
        and "is finished (it has model.json): nothing to resume" in result.output
    )
    result = invoke("train-student --epochs 3 --resume", tmp_path / "done")
    assert (
        result.exit_code == 2
        and "--resume continues with RUN_DIR/config.json; drop --epochs" in result.output
    )
    (tmp_path / "early").mkdir()
    config = json.loads((tmp_path / "done" / "config.json").read_text())
    (tmp_path / "early" / "config.json").write_text(json.dumps(config))
    result = invoke("train-student --resume", tmp_path / "early")
    assert result.exit_code == 1 and "stopped before its first epoch ended" in result.output
    result = invoke(
        "train-student --model kd_cnn --data synthetic --epochs 1 --alpha 0.5 --out", tmp_path / "x"
    )
    assert (
        result.exit_code == 2
        and "Missing option '--cache' (required unless --resume)" in result.output
    )


# --- streamed data: an image folder and WebDataset shards --------------------------------------


def store_files(out: Path) -> dict[str, bytes]:
    """Every array's chunks and metadata (not the root manifest, which holds timestamps, nor
    the progress flags): what a resumed pass must write exactly as an uninterrupted one."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and p.relative_to(out).parts[0] != "progress"
        and str(p.relative_to(out)) != "zarr.json"
        and not p.name.endswith(".partial")
    }


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_killed_pass_over_streamed_data_resumes_to_the_same_cache(
    kind: str, tmp_path: Path
) -> None:
    """cache-teacher over an image folder or shards (rows decoded on demand, views with
    crop-flip), SIGKILLed mid-way, run again: the chunks flagged before the kill are kept,
    and the store is the uninterrupted run's, array for array."""
    from conftest import invoke
    from test_imagefolder import noise_folder

    folder = noise_folder(tmp_path / "imgs", ("a", "b"), count=12, size=16)
    data = folder
    if kind == "shards":
        data = tmp_path / "shards"
        packed = invoke("pack-shards", folder, "--out", data, "--shard-size 7")
        assert packed.exit_code == 0, packed.output
    teacher = tmp_path / "t"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", data, "--out", teacher)
    assert made.exit_code == 0, made.output

    def pass_over(out: Path) -> list[str]:
        args = command(teacher, out)
        args[args.index("synthetic")] = str(data)
        args[args.index("--chunk-size") + 1] = "1"  # 24 chunks: room to be killed mid-way
        return [*args, "--views", "2", "--augment", "crop-flip", "--seed", "4"]

    reference, out = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    subprocess.run(pass_over(reference), check=True, capture_output=True)
    killed_after(pass_over(out), "chunks", 5)
    done = flagged(out)
    assert done == 5 and read_manifest(out).status == "writing"
    kept = {i: (out / "logprobs" / "c" / str(i) / "0" / "0").stat().st_mtime_ns
            for i in range(done)}  # fmt: skip
    final = subprocess.run(pass_over(out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert f"resuming, {done} of 24 chunks already written" in final.stdout + final.stderr
    assert store_files(out) == store_files(reference)
    ours, theirs = read_manifest(out), read_manifest(reference)
    assert ours.status == "complete" and ours.cache_id == theirs.cache_id
    assert ours.teacher_accuracy == theirs.teacher_accuracy
    for index, stamp in kept.items():  # flagged before the kill: never written again
        assert (out / "logprobs" / "c" / str(index) / "0" / "0").stat().st_mtime_ns == stamp


# --- a resumed run learns from the inputs it started with (issue 24.2) -------------------------


class Stopped(Exception):
    pass


def stopped_after_epoch_1(line: str) -> None:
    if line.startswith("epoch 1/"):
        raise Stopped


def test_resume_refuses_a_cache_remade_at_the_same_path(teacher_run: Path, tmp_path: Path) -> None:
    """Epochs 1-5 from one cache_id, 6-300 from another, and model.json naming only the
    second: the cache remade at the same path is refused, both ids named."""
    from conftest import invoke
    from kdpipe.train import TrainConfig, train_student

    path = tmp_path / "c.zarr"
    assert cache(teacher_run, path, "--temperature 2").exit_code == 0
    first = read_manifest(path).cache_id
    config = TrainConfig(model="kd_mlp_30x2", data="synthetic", out=str(tmp_path / "run"),
                         epochs=3, cache=str(path), alpha=0.5)  # fmt: skip
    with pytest.raises(Stopped):
        train_student(config, log=stopped_after_epoch_1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert cache(teacher_run, path, "--temperature 4 --overwrite").exit_code == 0
    second = read_manifest(path).cache_id
    assert first != second
    result = invoke("train-student --resume", tmp_path / "run")
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error: ")]
    assert f"cache (--cache) was {first}, is now {second}" in line
    assert "cannot resume on other inputs" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_resume_refuses_an_online_teacher_retrained_at_the_same_path(tmp_path: Path) -> None:
    from conftest import invoke
    from kdpipe.models.runs import read_card
    from kdpipe.train import TrainConfig, distill_online

    teacher = tmp_path / "teacher"
    train = "train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --out"
    assert invoke(train, teacher, "--seed 0").exit_code == 0
    first = read_card(teacher).weights_sha256
    config = TrainConfig(model="kd_mlp_30x2", data="synthetic", out=str(tmp_path / "run"),
                         epochs=3, teacher=str(teacher), alpha=0.5, temperature=4.0)  # fmt: skip
    with pytest.raises(Stopped):
        distill_online(config, log=stopped_after_epoch_1)
    assert invoke(train, teacher, "--seed 1 --overwrite").exit_code == 0
    second = read_card(teacher).weights_sha256
    result = invoke("distill-online --resume", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert f"teacher (teacher) was {first}, is now {second}" in result.output
    assert not (tmp_path / "run" / "model.json").exists()
