"""Caches on object storage: an S3-compatible server (moto's) on loopback, started here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from conftest import cache, invoke, student
from kdpipe.cache import (
    CHECKSUM_KEY,
    MANIFEST_KEY,
    load_soft_labels,
    manifest_checksum,
    read_manifest,
)

BUCKET = "kdpipe-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[fsspec.AbstractFileSystem]:
    """A moto S3 server on a free loopback port, with one bucket; fsspec pointed at it."""
    from kdpipe.tools.scale import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION")}  # fmt: skip
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{port}"}
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


OPTIONS = "--split train --temperature 4 --chunk-size 128"  # the train_cache fixture's


def test_write_verify_and_train_from_s3(
    s3: fsspec.AbstractFileSystem, teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/train.zarr"
    result = cache(teacher_run, url, OPTIONS)
    assert result.exit_code == 0, result.output
    assert s3.isfile(f"{BUCKET}/train.zarr/logprobs/c/4/0/0")
    result = invoke("verify", url)
    assert result.exit_code == 0, result.output
    assert "5 chunk(s): flags, files, checksums, positions, values ok" in result.output
    remote, local = load_soft_labels(url), load_soft_labels(train_cache)
    assert remote.manifest.cache_id == local.manifest.cache_id
    assert str(remote.path) == url
    for name in ("values", "labels", "indices", "views", "partners"):
        assert np.array_equal(getattr(remote, name).numpy(), getattr(local, name).numpy()), name
    # the same student from either copy: the same weights
    cards = {}
    for where, source in (("s3", url), ("local", train_cache)):
        run = tmp_path / where
        assert student(source, run).exit_code == 0
        cards[where] = json.loads((run / "model.json").read_text())
    assert cards["s3"]["weights_sha256"] == cards["local"]["weights_sha256"]
    assert cards["s3"]["lineage"]["cache_path"] == url
    # the commands that read a cache take the URL too
    result = invoke("storage", url, "--top-k 1,2")
    assert result.exit_code == 0, result.output
    assert "top-2 float16" in result.output
    result = invoke("lineage", tmp_path / "s3")
    assert result.exit_code == 0, result.output
    assert url in result.output and "cache_id matches" in result.output
    # caches lists what lies below a bucket prefix (issue 24: URLs were refused outright)
    result = invoke("caches", f"s3://{BUCKET}", "--format json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["path"] == url and row["samples"] == remote.manifest.num_samples
    fails = invoke("caches", f"s3://{BUCKET}/no-such-prefix")
    assert fails.exit_code == 2 and "does not exist" in fails.output
    # and streamed from the bucket, chunk by chunk
    result = student(url, tmp_path / "streamed", "--alpha 0.5 --cache-memory 40K")
    assert result.exit_code == 0, result.output
    assert "streaming it" in result.output


def test_resume_and_refusals_on_s3(
    s3: fsspec.AbstractFileSystem, teacher_run: Path, train_cache: Path
) -> None:
    url = f"s3://{BUCKET}/partial.zarr"
    assert cache(teacher_run, url, OPTIONS).exit_code == 0
    # a pass that stopped before chunk 3 of logprobs was written: resumed there
    meta_key = f"{BUCKET}/partial.zarr/zarr.json"
    meta = json.loads(s3.cat_file(meta_key))
    meta["attributes"][MANIFEST_KEY]["status"] = "writing"
    meta["attributes"][CHECKSUM_KEY] = manifest_checksum(meta["attributes"][MANIFEST_KEY])
    s3.pipe_file(meta_key, json.dumps(meta).encode())
    s3.rm(f"{BUCKET}/partial.zarr/logprobs/c/3/0/0")
    result = cache(teacher_run, url, OPTIONS)
    assert result.exit_code == 0, result.output
    assert "resuming, 4 of 5 chunks already written" in result.output
    assert read_manifest(url).status == "complete"
    local = zarr.open_group(str(train_cache), mode="r")
    remote = zarr.open_group(url, mode="r")
    assert np.array_equal(remote["logprobs"][:], local["logprobs"][:])
    # an existing cache made otherwise is refused, naming the difference, and left whole
    result = cache(teacher_run, url, "--split train --temperature 2 --chunk-size 128")
    assert result.exit_code == 1
    assert "holds a cache made with other arguments (temperature 4.0 != 2.0)" in result.output
    assert read_manifest(url).temperature == 4.0
    # something that is not a cache
    s3.pipe_file(f"{BUCKET}/notes/readme.txt", b"hello")
    result = invoke("verify", f"s3://{BUCKET}/notes")
    assert result.exit_code == 1
    assert f"s3://{BUCKET}/notes is not a kdpipe cache (no zarr.json" in result.output
    result = cache(teacher_run, f"s3://{BUCKET}/notes", OPTIONS)
    assert result.exit_code == 1
    assert "already exists and is not a kdpipe cache to resume" in result.output
    assert s3.cat_file(f"{BUCKET}/notes/readme.txt") == b"hello"
