"""kdpipe verify: each kind of damage is found and named, by verify and by train-student."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import edit_manifest, invoke, student
from kdpipe.check.verify import verify_cache
from kdpipe.data.datasets import make_synthetic


@pytest.fixture
def copy(train_cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, target)
    return target


def run_verify(cache: Path, *options: str | Path) -> object:
    return invoke("verify", cache, *options)


def test_a_sound_cache_passes_every_check(copy: Path, teacher_run: Path) -> None:
    result = run_verify(copy, "--data synthetic --recompute 40 --teacher", teacher_run)
    assert result.exit_code == 0, result.output
    for check in ("manifest", "status", "arrays", "chunks", "dataset", "labels", "recompute"):
        assert check in result.output
    assert "FAIL" not in result.output


def refused_by_both(cache: Path, tmp_path: Path, by_verify: str, by_reader: str) -> None:
    """verify fails naming the damage, and so does train-student's reader."""
    result = run_verify(cache)
    assert result.exit_code == 1 and by_verify in result.output, result.output
    trained = student(cache, tmp_path / "s")
    assert trained.exit_code == 1 and by_reader in trained.output, trained.output


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte(copy: Path, tmp_path: Path) -> None:
    flip_byte(copy / "logprobs" / "c" / "1" / "0" / "0")
    refused_by_both(
        copy,
        tmp_path,
        "chunk 1 (rows 128-255): unreadable, checksum or compression error",
        "chunk 1 of 'logprobs' (rows 128-255) is corrupt",
    )


def test_deleted_chunk(copy: Path, tmp_path: Path) -> None:
    (copy / "labels" / "c" / "2").unlink()
    refused_by_both(
        copy,
        tmp_path,
        "chunk 2 (rows 256-383): missing file(s) of labels",
        "1 chunk(s) of 'labels' are missing",
    )


def test_truncated_manifest(copy: Path, tmp_path: Path) -> None:
    meta = copy / "zarr.json"
    meta.write_text(meta.read_text()[:200])
    refused_by_both(copy, tmp_path, "is not valid JSON", "is not valid JSON")


def test_unknown_format_version(copy: Path) -> None:
    edit_manifest(copy, format_version=7)
    result = run_verify(copy)
    assert result.exit_code == 1 and "format_version 7 is not supported" in result.output


def test_values_that_are_not_distributions(copy: Path, tmp_path: Path) -> None:
    import zarr

    array = zarr.open_array(str(copy / "logprobs"), mode="r+")
    block = array[130:132]
    block[0, 0, 0] = float("nan")
    block[1, 0, :] += 1.0  # shifted: sums to e, not 1
    array[130:132] = block
    result = run_verify(copy)
    assert result.exit_code == 1
    assert "chunk 1 (rows 128-255): NaN or Inf at row(s) 130" in result.output
    trained = student(copy, tmp_path / "s")
    assert trained.exit_code == 1 and "NaN or Inf soft labels at row(s) 130" in trained.output
    block[0, 0, 0] = -1.0  # finite again, but row 130 no longer sums to 1 either
    array[130:132] = block
    result = run_verify(copy)
    assert "not a distribution (logsumexp off by up to 1) at row(s) 130, 131" in result.output


def test_labels_and_recompute_mismatch(copy: Path, teacher_run: Path) -> None:
    import zarr

    labels = zarr.open_array(str(copy / "labels"), mode="r+")
    labels[7] = (int(labels[7]) + 1) % 5
    logprobs = zarr.open_array(str(copy / "logprobs"), mode="r+")
    row = logprobs[300:301]
    logprobs[300:301] = row[:, :, ::-1]  # a valid distribution, but not the teacher's
    report = verify_cache(copy, dataset=make_synthetic("train"), recompute=600,
                          teachers=[teacher_run])  # fmt: skip
    failures = "\n".join(report.failures())
    assert "labels: differ at row(s) 7" in failures
    assert "recompute: " in failures and "differ at row(s) 300" in failures


def test_incomplete_cache_is_reported(copy: Path) -> None:
    edit_manifest(copy, status="writing")
    (copy / "progress" / "c" / "4").unlink()
    result = run_verify(copy)
    assert result.exit_code == 1
    assert "status 'writing': the teacher pass did not finish" in result.output
    # an unfinished pass: its unwritten chunks in one short line, no false order problem
    assert "1 of 5 chunk(s) not written yet (4): run cache-teacher again" in result.output
    assert "strictly increasing" not in result.output


def test_edited_manifest_and_array_metadata_are_detected(copy: Path, tmp_path: Path) -> None:
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["kdpipe"]["temperature"] = 5.0  # edited by hand, checksum not updated
    (copy / "zarr.json").write_text(json.dumps(meta))
    refused_by_both(
        copy, tmp_path, "the manifest does not match its checksum", "does not match its checksum"
    )
    edit_manifest(copy, temperature=4.0)
    array_meta = copy / "labels" / "zarr.json"
    array_meta.write_text(array_meta.read_text().replace('"fill_value": -1', '"fill_value": -2'))
    refused_by_both(
        copy,
        tmp_path,
        "labels/zarr.json does not match its checksum in the manifest",
        "labels/zarr.json does not match",
    )


def test_a_flipped_progress_flag_is_detected(copy: Path, tmp_path: Path) -> None:
    flip_byte(copy / "progress" / "c" / "3", offset=-1)  # inside the crc32c of the flag
    refused_by_both(
        copy,
        tmp_path,
        "chunk 3 (rows 384-511): unreadable, checksum or compression error",
        "chunk 3 of 'progress'",
    )


def test_swapped_chunks_are_detected_by_verify_and_every_reader(copy: Path, tmp_path: Path) -> None:
    """crc32c covers bytes, not where they belong: chunks 1 and 2 of the soft labels swapped
    (each intact) are caught by the position digests, by verify and by both readers."""
    one, two = (copy / "logprobs" / "c" / str(i) / "0" / "0" for i in (1, 2))
    first, second = one.read_bytes(), two.read_bytes()
    one.write_bytes(second)
    two.write_bytes(first)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    refused_by_both(
        copy,
        tmp_path,
        "chunk 1 (rows 128-255): logprobs not what was written at chunk 1",
        "chunk 1 of 'logprobs' (rows 128-255) is not this cache's chunk 1",
    )
    streamed = student(copy, tmp_path / "streamed", "--alpha 0.5 --cache-memory 40K")
    assert streamed.exit_code == 1 and "is not this cache's chunk" in streamed.output
    assert not (tmp_path / "s").exists()  # read whole: refused before the run starts
    assert not (tmp_path / "streamed" / "model.json").exists()  # streamed: stopped unfinished
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # untouched


def test_a_chunk_copied_from_another_cache_is_detected(
    copy: Path, teacher_run: Path, tmp_path: Path
) -> None:
    """A chunk from a cache of the same shape (here another temperature) is not this cache's."""
    from conftest import cache

    other = tmp_path / "other.zarr"
    assert cache(teacher_run, other, "--temperature 3 --chunk-size 128").exit_code == 0
    for name in ("logprobs", "chunk_digests"):  # the chunk and its digest, both copied in
        (source,) = (p for p in (other / name / "c" / "3").rglob("*") if p.is_file())
        target = copy / source.relative_to(other)
        target.write_bytes(source.read_bytes())
    refused_by_both(
        copy,
        tmp_path,
        "not what was written at chunk 3 (moved from another position, copied from another "
        "cache, or rewritten)",
        "chunk 3 of 'logprobs' (rows 384-511) is not this cache's chunk 3",
    )


def test_a_re_signed_manifest_cannot_pass_as_another_cache(copy: Path, tmp_path: Path) -> None:
    """T edited and the checksum recomputed: the cache_id no longer follows from the fields."""
    edit_manifest(copy, temperature=8.0)
    refused_by_both(copy, tmp_path, "is not the one its fields give", "the manifest was edited")
    edit_manifest(copy, temperature=4.0, teacher_id="0" * 16)
    refused_by_both(
        copy, tmp_path, "teacher_id 0000000000000000 is not the one its teachers", "was edited"
    )


def test_a_group_in_an_array_s_place_is_named(copy: Path) -> None:
    """logprobs/zarr.json replaced by a group's metadata: one line, no KeyError."""
    (copy / "logprobs" / "zarr.json").write_text('{"zarr_format":3,"node_type":"group"}')
    result = run_verify(copy)
    assert result.exit_code == 1
    assert "logprobs/zarr.json does not match its checksum in the manifest" in result.output
    assert "Traceback" not in result.output and "KeyError" not in result.output


# --- a temperature the stored dtype cannot hold (issue 24.1) ------------------------------------


@pytest.fixture(scope="module")
def soft_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher with small logits (one epoch at a low learning rate): at T = 1000 its
    log-probabilities differ by less than float16's step, as Fashion-MNIST's did."""
    out = tmp_path_factory.mktemp("soft-teacher") / "run"
    result = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --lr 0.001 "
                    "--seed 0 --out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def cache_of(teacher: Path, out: Path, options: str) -> object:
    return invoke("cache-teacher --data synthetic --teacher", teacher, "--out", out, options)


@pytest.mark.parametrize("options", ["--temperature 1000", "--temperature 500 --top-k 3"])
def test_a_temperature_the_dtype_cannot_hold_is_refused(
    soft_teacher: Path, tmp_path: Path, options: str
) -> None:
    """T = 1000 (the documented maximum) stored an exactly uniform float16 cache that
    verify passed; T = 500 in a top-3 cache stores its three values tied, or in the wrong
    order. Both are refused before the cache is complete, saying what to do."""
    from kdpipe.cache import read_manifest

    out = tmp_path / "c.zarr"
    result = cache_of(soft_teacher, out, options)
    assert result.exit_code == 1, result.output
    assert "is too high for --dtype float16" in result.output
    assert "lower --temperature or pass --dtype float32" in result.output
    assert sum(line.startswith("Error: ") for line in result.output.splitlines()) == 1
    assert read_manifest(out).status == "writing"  # never complete: no reader takes it
    # float32 holds the ranking at the same T: the cache is made, and verify passes it
    result = cache_of(soft_teacher, tmp_path / "f32.zarr", f"{options} --dtype float32")
    assert result.exit_code == 0, result.output
    assert run_verify(tmp_path / "f32.zarr").exit_code == 0


def test_verify_names_a_cache_whose_rows_are_uniform(
    soft_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache written without the writer's check (as before it) at T = 1000: every row
    the same uniform distribution, which verify called 'values ok'."""
    import kdpipe.models.teach

    monkeypatch.setattr(kdpipe.models.teach, "LOST_RANKING_SHARE", 1.0, raising=False)  # old writer
    monkeypatch.setattr(kdpipe.models.teach, "UNIFORM_SHARE", 1.0, raising=False)
    out = tmp_path / "uniform.zarr"
    result = cache_of(soft_teacher, out, "--temperature 1000")
    assert result.exit_code == 0, result.output
    assert "teacher accuracy 0.2" in result.output  # argmax of ties: class 0, 1 in 5
    report = verify_cache(out)
    assert not report.ok
    (line,) = report.failures()
    assert line.startswith("chunks: ") and "rows and views uniform" in line and "T=1000" in line


# --- every manifest field in the cache_id or recomputed by verify (issue 24.3) -----------------


def test_a_re_signed_teacher_accuracy_is_recomputed(copy: Path) -> None:
    """teacher_accuracy edited (to 0.995) with the checksum recomputed passed verify, and
    report then showed the cache's teacher at 1 error: it is recomputed from the values."""
    true = json.loads((copy / "zarr.json").read_text())["attributes"]["kdpipe"]["teacher_accuracy"]
    edit_manifest(copy, teacher_accuracy=0.995)
    report = verify_cache(copy)
    (line,) = report.failures()
    assert line == f"teacher accuracy: 0.995 recorded, {true} from the stored values and labels"


def test_re_signed_fields_outside_the_id_are_named(copy: Path) -> None:
    """Counts and the completion record are in no id: each edit contradicts another field
    or the arrays, and verify says which."""
    manifest = json.loads((copy / "zarr.json").read_text())["attributes"]["kdpipe"]
    edit_manifest(copy, chunk_size=manifest["chunk_size"] // 2, completed=None)
    failures = " | ".join(verify_cache(copy).failures())
    assert "status 'complete' with completed None" in failures
    assert "chunked by 128 rows, the manifest's chunk_size is 64" in failures
