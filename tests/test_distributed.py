"""Both stages under torchrun with two CPU processes (gloo), against one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import cache, edit_manifest, invoke
from kdpipe.cache import load_soft_labels, read_manifest
from test_resume import chunk_files


def kdpipe(*args: str | Path, processes: int = 1) -> subprocess.CompletedProcess:
    """kdpipe in a subprocess; with ``processes`` > 1, started by torchrun."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"]  # fmt: skip
    result = subprocess.run(
        [*launcher, "-m", "kdpipe", *map(str, args)], capture_output=True, text=True
    )
    return result


def cache_args(teacher: Path, out: Path) -> list[str | Path]:
    return ["cache-teacher", "--data", "synthetic", "--teacher", teacher, "--temperature", "3",
            "--views", "2", "--augment", "shift-flip", "--chunk-size", "64",
            "--out", out]  # fmt: skip


def test_two_processes_write_the_single_process_cache(teacher_run: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert kdpipe(*cache_args(teacher_run, one)).returncode == 0
    result = kdpipe(*cache_args(teacher_run, two), processes=2)
    assert result.returncode == 0, result.stderr
    assert chunk_files(two) == chunk_files(one)  # byte-identical chunks
    a, b = load_soft_labels(one), load_soft_labels(two)
    assert a.manifest.cache_id == b.manifest.cache_id
    assert a.manifest.teacher_accuracy == b.manifest.teacher_accuracy
    assert torch.equal(a.views, b.views) and torch.equal(a.values, b.values)
    # one closing line, from rank 0
    assert result.stdout.count("cache_id") == 1, result.stdout


def test_resume_with_another_number_of_processes(teacher_run: Path, tmp_path: Path) -> None:
    """A pass stopped with chunks 1, 4, 5 and 8 missing, resumed by two processes."""
    one = tmp_path / "one.zarr"
    assert kdpipe(*cache_args(teacher_run, one)).returncode == 0
    partial = tmp_path / "partial.zarr"
    shutil.copytree(one, partial)
    edit_manifest(partial, status="writing", teacher_accuracy=None, completed=None)
    for index in (1, 4, 5, 8):
        (partial / "logprobs" / "c" / str(index) / "0" / "0").unlink()
    result = kdpipe(*cache_args(teacher_run, partial), processes=2)
    assert result.returncode == 0, result.stderr
    assert "resuming, 6 of 10 chunks already written" in result.stdout + result.stderr
    assert chunk_files(partial) == chunk_files(one)
    assert read_manifest(partial).status == "complete"
    assert read_manifest(partial).teacher_accuracy == read_manifest(one).teacher_accuracy


LATE_RANK_ZERO = """
import os, sys, time
from kdpipe.cache.store import CacheWriter
from kdpipe.cli import main

read = CacheWriter.finished_chunks
late = [os.environ["RANK"] == "0"]


def finished_chunks(self):
    # rank 0 looks late (a loaded machine): until another rank has written a chunk, or 5 s
    if late.pop() if late else False:
        first, deadline = len(read(self)), time.monotonic() + 5
        while len(read(self)) == first and time.monotonic() < deadline:
            time.sleep(0.01)
    return read(self)


CacheWriter.finished_chunks = finished_chunks
main(args=sys.argv[1:], prog_name="kdpipe")
"""


def test_ranks_resume_from_one_count_of_the_finished_chunks(
    teacher_run: Path, tmp_path: Path
) -> None:
    """The load failure of 27.5 made certain: rank 0 reads the store late, after rank 1 may
    have written a chunk. Every rank takes rank 0's count, read before any rank writes, so
    the message says 6 of 10 and the shares cover each missing chunk once."""
    one = tmp_path / "one.zarr"
    assert kdpipe(*cache_args(teacher_run, one)).returncode == 0
    partial = tmp_path / "partial.zarr"
    shutil.copytree(one, partial)
    edit_manifest(partial, status="writing", teacher_accuracy=None, completed=None)
    for index in (1, 4, 5, 8):
        (partial / "logprobs" / "c" / str(index) / "0" / "0").unlink()
    launcher = tmp_path / "late_rank_zero.py"
    launcher.write_text(LATE_RANK_ZERO)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         launcher, *map(str, cache_args(teacher_run, partial))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "resuming, 6 of 10 chunks already written" in result.stdout + result.stderr
    assert chunk_files(partial) == chunk_files(one)
    assert read_manifest(partial).status == "complete"


def student_args(cache: Path, out: Path) -> list[str | Path]:
    # batch 7: 600 rows end in a batch of 5, shared 3 + 2 between the two processes
    return ["train-student", "--model", "kd_mlp_30x2", "--data", "synthetic", "--cache", cache,
            "--alpha", "0.5", "--epochs", "2", "--batch-size", "7", "--seed", "3",
            "--out", out]  # fmt: skip


def test_ddp_student_matches_one_process(train_cache: Path, tmp_path: Path) -> None:
    """Without BatchNorm or dropout, the order, the batches and the gradients are those of
    one process: the weights agree up to the order of float additions."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert kdpipe(*student_args(train_cache, one)).returncode == 0
    result = kdpipe(*student_args(train_cache, two), processes=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("student kd_mlp_30x2 from cache") == 1
    a = safetensors.torch.load_file(str(one / "model.safetensors"))
    b = safetensors.torch.load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    rows_one = np.genfromtxt(one / "metrics.csv", delimiter=",", names=True)
    rows_two = np.genfromtxt(two / "metrics.csv", delimiter=",", names=True)
    np.testing.assert_allclose(rows_two["loss"], rows_one["loss"], rtol=1e-4)
    assert list(rows_two["train_accuracy"]) == list(rows_one["train_accuracy"])
    assert not (two / "checkpoint.json").exists()  # a finished run keeps no resume state


def test_online_distillation_refuses_torchrun(teacher_run: Path, tmp_path: Path) -> None:
    result = kdpipe("distill-online", "--model", "kd_mlp_30x2", "--data", "synthetic",
                    "--teacher", teacher_run, "--alpha", "0.5", "--temperature", "2",
                    "--epochs", "1", "--out", tmp_path / "run", processes=2)  # fmt: skip
    assert result.returncode != 0
    assert "distill-online runs in one process" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dataloader_workers_build_the_same_batches(train_cache: Path, tmp_path: Path) -> None:
    """Batches built ahead by two worker processes are the ones the loop builds itself:
    the same run, to the bit (jitter is drawn in the loop, from its generator)."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        result = invoke("train-student --model kd_cnn --data synthetic --epochs 2 --alpha 0.5 "
                        f"--jitter 1 --batch-size 64 --workers {workers} --cache", train_cache,
                        "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[workers] = json.loads((out / "model.json").read_text())["weights_sha256"]
    assert runs[0] == runs[2]


def test_bf16_teacher_pass(teacher_run: Path, train_cache: Path, tmp_path: Path) -> None:
    """--precision bf16 is recorded, changes the cache's identity, stays close to float32,
    and a float32 pass cannot resume a bf16 one."""
    out = tmp_path / "bf16.zarr"
    options = "--split train --temperature 4 --chunk-size 128"
    result = cache(teacher_run, out, f"{options} --precision bf16")
    assert result.exit_code == 0, result.output
    bf16, fp32 = load_soft_labels(out), load_soft_labels(train_cache)
    assert (bf16.manifest.precision, fp32.manifest.precision) == ("bfloat16", "float32")
    assert bf16.manifest.cache_id != fp32.manifest.cache_id
    difference = (bf16.values.float().exp() - fp32.values.float().exp()).abs()
    assert 0 < float(difference.max()) < 0.05
    edit_manifest(out, status="writing")
    result = cache(teacher_run, out, options)
    assert result.exit_code == 1
    assert "precision bfloat16 != float32" in result.output


def test_two_processes_over_an_image_folder_write_the_one_process_cache(tmp_path: Path) -> None:
    """torchrun over an image folder (rows decoded on demand in each process, crop-flip views
    with mixup partners from other ranks' chunks): the one-process store, byte for byte."""
    from test_imagefolder import noise_folder
    from test_resume import store_files

    folder = noise_folder(tmp_path / "imgs", ("a", "b", "c"), count=4, size=16)
    teacher = tmp_path / "t"
    made = invoke("train-teacher --model kd_cnn --epochs 1 --data", folder, "--out", teacher)
    assert made.exit_code == 0, made.output

    def args(out: Path) -> list[str | Path]:
        return ["cache-teacher", "--data", folder, "--teacher", teacher, "--temperature", "2",
                "--views", "2", "--augment", "crop-flip", "--mix", "mixup", "--chunk-size", "2",
                "--batch-size", "3", "--out", out]  # fmt: skip

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    single = kdpipe(*args(one))
    assert single.returncode == 0, single.stderr
    result = kdpipe(*args(two), processes=2)
    assert result.returncode == 0, result.stderr
    assert store_files(two) == store_files(one)
    a, b = load_soft_labels(one), load_soft_labels(two)
    assert a.manifest.cache_id == b.manifest.cache_id and a.manifest.num_samples == 12
    assert a.manifest.teacher_accuracy == b.manifest.teacher_accuracy
    assert torch.equal(a.values, b.values) and torch.equal(a.views, b.views)
    assert (a.partners >= 0).all()
    assert result.stdout.count("cache_id") == 1, result.stdout


def two_nodes(args: list[str | Path], kill_after: dict[int, str], logs: Path) -> list[int]:
    """``kdpipe ARGS`` as two torchrun launches of one process each (``--nnodes 2``, a
    localhost rendezvous: two nodes, simulated); node ``n`` in ``kill_after`` SIGKILLs
    itself at that point (``KDPIPE_TEST_KILL_AFTER``). Returns both exit codes; a node left
    waiting for its dead peer is stopped once the other has gone (it cannot finish). Each
    node's output goes to ``logs``-node0.log and -node1.log."""
    import os

    from kdpipe.tools.scale import kill_node, node_commands

    nodes = []
    for rank, command in enumerate(node_commands(["-m", "kdpipe", *map(str, args)])):
        env = {k: v for k, v in os.environ.items() if k != "KDPIPE_TEST_KILL_AFTER"}
        if rank in kill_after:
            env["KDPIPE_TEST_KILL_AFTER"] = kill_after[rank]
        with Path(f"{logs}-node{rank}.log").open("w") as log:  # the child keeps its copy
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    codes: list[int | None] = [None, None]
    while None in codes:
        for rank, node in enumerate(nodes):
            codes[rank] = node.poll()
        if any(code not in (None, 0) for code in codes):  # one node lost: stop the other
            for node in nodes:
                if node.poll() is None:
                    try:
                        node.wait(timeout=60)  # its own error first, if it sees the loss
                    except subprocess.TimeoutExpired:
                        kill_node(node.pid)  # the agent and its workers (own sessions)
            codes = [node.wait() for node in nodes]
        elif None in codes:
            time.sleep(0.1)  # polling for an exit, not a timing the test depends on
    return [int(code) for code in codes]


def test_two_nodes_one_killed_then_resumed_equal_one_process(
    teacher_run: Path, tmp_path: Path
) -> None:
    """Two simulated nodes write one cache; node 1 is SIGKILLed after its second durable
    chunk (node 0 then fails or is stopped: the job is lost); the rerun on two nodes resumes
    and the store equals the one-process store byte for byte. Then a two-node student whose
    rank 0 is killed after its first epoch's checkpoint resumes in one process and ends
    where the one-process run ends (issue 26.3)."""
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert kdpipe(*cache_args(teacher_run, one)).returncode == 0
    codes = two_nodes(cache_args(teacher_run, two), {1: "chunks:2"}, tmp_path / "killed")
    assert codes[1] != 0 and read_manifest(two).status == "writing", codes
    survivor = (tmp_path / "killed-node0.log").read_text()
    assert "Error: rank 0 of 2: another process of this run stopped (" in survivor, survivor
    assert two_nodes(cache_args(teacher_run, two), {}, tmp_path / "rerun") == [0, 0]
    log = (tmp_path / "rerun-node0.log").read_text()
    assert "resuming, " in log and "chunks already written" in log, log
    assert chunk_files(two) == chunk_files(one)
    assert read_manifest(two).status == "complete"
    assert read_manifest(two).cache_id == read_manifest(one).cache_id

    solo, pair = tmp_path / "solo", tmp_path / "pair"
    assert kdpipe(*student_args(one, solo)).returncode == 0
    codes = two_nodes(student_args(two, pair), {0: "epochs:1"}, tmp_path / "student")
    assert codes[0] != 0 and not (pair / "model.json").exists(), codes
    survivor = (tmp_path / "student-node1.log").read_text()
    assert "Error: rank 1 of 2: another process of this run stopped (" in survivor, survivor
    resumed = kdpipe("train-student", "--resume", pair)
    assert resumed.returncode == 0, resumed.stderr
    a = safetensors.torch.load_file(str(solo / "model.safetensors"))
    b = safetensors.torch.load_file(str(pair / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_a_lost_peer_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo's error for a dead peer, as the two-node test meets it, becomes one line with
    what to do; any other RuntimeError, or one outside torchrun, stays what it was."""
    from kdpipe.cli.base import lost_peer

    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read "
                        "error [127.0.0.1]:44697: Connection reset by peer. This is typically "
                        "caused by a remote worker hanging")  # fmt: skip
    assert lost_peer(gloo) is None  # not under torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert lost_peer(gloo) == (
        "rank 1 of 2: another process of this run stopped (Read error [127.0.0.1]:44697: "
        "Connection reset by peer. This is typically caused by a remote worker hanging); what "
        "was written is kept: run the same command again on every node to resume "
        "(train-student: --resume RUN_DIR)"
    )
    assert lost_peer(RuntimeError("CUDA out of memory")) is None
