"""The cache contract: values, manifest, ids, re-tempering, and damage detection."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zarr
from conftest import edit_manifest
from kdpipe.base.errors import CacheError, CacheIncompleteError, ManifestError, NotACacheError
from kdpipe.cache import Manifest, load_soft_labels, read_manifest, retemper
from kdpipe.data.datasets import make_synthetic
from kdpipe.models.runs import load_model
from kdpipe.models.teacher import combine_members, predict_logits


def test_stored_values_are_the_teachers_log_softmax_at_t(
    teacher_run: Path, train_cache: Path
) -> None:
    soft = load_soft_labels(train_cache)
    data = make_synthetic("train")
    model, card = load_model(teacher_run)
    logits = predict_logits(model, data.images, card.data, device=torch.device("cpu"))
    expected = torch.log_softmax(logits / 4.0, dim=-1)
    assert soft.values.dtype == torch.float16 and soft.values.shape == (600, 1, 5)
    assert torch.allclose(soft.values[:, 0].float(), expected, atol=2e-2)
    assert torch.equal(soft.labels, data.labels)
    sums = torch.logsumexp(soft.values[:, 0].float(), dim=-1)
    assert sums.abs().max() < 1e-2


def test_manifest_records_what_produced_the_cache(teacher_run: Path, train_cache: Path) -> None:
    manifest = read_manifest(train_cache)
    card = load_model(teacher_run)[1]
    assert manifest.status == "complete" and manifest.completed
    assert manifest.temperature == 4.0 and manifest.num_views == 1 and manifest.dtype == "float16"
    assert manifest.teachers[0].weights_sha256 == card.weights_sha256
    assert manifest.dataset["fingerprint"] == make_synthetic("train").fingerprint()
    assert manifest.dataset["split"] == "train"
    assert 0.0 <= manifest.teacher_accuracy <= 1.0
    assert {"torch", "timm", "zarr", "numpy", "python"} <= set(manifest.software)
    # readable with plain zarr, no kdpipe involved
    group = zarr.open_group(str(train_cache), mode="r")
    assert group.attrs["kdpipe"]["cache_id"] == manifest.cache_id
    codecs = [c["name"] for c in group["logprobs"].metadata.to_dict()["codecs"]]
    assert codecs == ["bytes", "zstd", "crc32c"]


def test_manifest_parsing_is_strict(train_cache: Path) -> None:
    data = read_manifest(train_cache).to_dict()
    assert Manifest.from_dict(data).to_dict() == data
    with pytest.raises(ManifestError, match=r"unknown field.*surprise"):
        Manifest.from_dict({**data, "surprise": 1})
    with pytest.raises(ManifestError, match="missing field 'temperature'"):
        Manifest.from_dict({k: v for k, v in data.items() if k != "temperature"})
    with pytest.raises(ManifestError, match="field 'num_samples' has type str"):
        Manifest.from_dict({**data, "num_samples": "600"})
    with pytest.raises(ManifestError, match="format_version 99 is not supported"):
        Manifest.from_dict({**data, "format_version": 99})
    with pytest.raises(ManifestError, match=r"temperature must be a number from 0\.01 to 1000"):
        Manifest.from_dict({**data, "temperature": 0})
    bad_scale = {**data["views"], "crop_scale": [0.9, 0.5]}
    with pytest.raises(ManifestError, match=r"views crop_scale \[0.9, 0.5\] is not \[MIN, MAX\]"):
        Manifest.from_dict({**data, "views": bad_scale})


def test_retemper_is_exact() -> None:
    logits = torch.randn(50, 7, dtype=torch.float64) * 5
    stored = torch.log_softmax(logits / 4.0, dim=-1)
    for wanted in (1.0, 2.5, 20.0):
        assert torch.allclose(retemper(stored, 4.0, wanted), torch.log_softmax(logits / wanted, -1))


def test_ensemble_combinations() -> None:
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    mean_probs = combine_members([a, b], 2.0, "mean-probs")
    expected = torch.log((torch.softmax(a / 2, -1) + torch.softmax(b / 2, -1)) / 2)
    assert torch.allclose(mean_probs, expected, atol=1e-6)
    mean_logits = combine_members([a, b], 2.0, "mean-logits")
    assert torch.allclose(mean_logits, torch.log_softmax((a + b) / 2 / 2, -1), atol=1e-6)
    single = combine_members([a], 3.0, "mean-probs")
    assert torch.allclose(single, torch.log_softmax(a / 3, -1), atol=1e-6)


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(cache, target)
    return target


def test_a_flipped_byte_is_reported_with_its_chunk(train_cache: Path, tmp_path: Path) -> None:
    cache = copy_cache(train_cache, tmp_path)
    chunk = cache / "logprobs" / "c" / "2" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"chunk 2 of 'logprobs' \(rows 256-383\) is corrupt"):
        load_soft_labels(cache)


def test_a_deleted_chunk_is_detected(train_cache: Path, tmp_path: Path) -> None:
    cache = copy_cache(train_cache, tmp_path)
    (cache / "labels" / "c" / "4").unlink()
    with pytest.raises(CacheError, match="1 chunk\\(s\\) of 'labels' are missing"):
        load_soft_labels(cache)


def test_incomplete_and_foreign_stores_are_refused(train_cache: Path, tmp_path: Path) -> None:
    cache = copy_cache(train_cache, tmp_path)
    edit_manifest(cache, status="writing")
    with pytest.raises(CacheIncompleteError, match="is not complete \\(status 'writing'\\)"):
        load_soft_labels(cache)
    (cache / "zarr.json").write_text('{"attributes": {"kdpipe": {"format_')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_soft_labels(cache)
    with pytest.raises(NotACacheError, match=r"no zarr.json"):
        load_soft_labels(tmp_path)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(NotACacheError, match="not a kdpipe cache \\(no 'kdpipe' manifest\\)"):
        load_soft_labels(tmp_path / "plain.zarr")


def test_cache_id_depends_on_what_produced_the_values(train_cache: Path) -> None:
    from kdpipe.cache import derive_cache_id

    manifest = read_manifest(train_cache)
    assert derive_cache_id(manifest) == manifest.cache_id
    hotter = replace(manifest, temperature=8.0)
    assert derive_cache_id(hotter) != manifest.cache_id
