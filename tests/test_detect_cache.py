"""Stage one for detection (issue 25, step 3): cache-teacher on a YOLO teacher, the reader a
detection student learns from, verify, caches and lineage, and the bad inputs between the
two tasks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails, invoke, snapshot
from kdpipe.base.errors import CacheMismatchError
from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder

if importlib.util.find_spec("ultralytics") is None:  # not imported: kdpipe's door does it
    pytest.skip("the detect extra: pip install 'kdpipe[detect]'", allow_module_level=True)

from kdpipe.cache import array_specs, load_soft_labels, read_detection_manifest
from kdpipe.check.catalog import catalog, lineage
from kdpipe.check.verify import verify_cache
from kdpipe.data.yolo import load_detection_split
from kdpipe.tasks.detect.cache import DetectionCache
from kdpipe.tasks.detect.runs import card_for, load_detection_run, save_detection_run
from kdpipe.tasks.detect.targets import DetectBatch
from kdpipe.tasks.detect.views import PLAIN_VIEW, read_image, render
from kdpipe.tasks.detect.yolo import create_detector, head_outputs, ultralytics

SIZE = 64
CLASSES = ["a", "b", "c", "d", "e"]
ANCHORS = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2


@pytest.fixture(scope="module")
def detect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "set"
    build_detect_folder(out, {"train": 8, "val": 2, "test": 2}, source="synthetic",
                        recipe=DetectRecipe(), log=lambda line: None)  # fmt: skip
    return out


def _teacher(out: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    """A yolo11n teacher run directory, 0 epochs: fresh weights whose batch-norm statistics
    are measured on a few random batches (left at their initial values, activations shrink
    layer by layer and every image gets the same outputs), so the outputs depend on every
    pixel, which is all these tests need."""
    torch.manual_seed(seed)
    model = create_detector("yolo11n.yaml", len(CLASSES)).float()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.rand(8, 3, SIZE, SIZE))
    model.eval()
    card = card_for(model, kind="teacher", classes=CLASSES, image_size=SIZE,
                    source={"kind": "test", "seed": seed})  # fmt: skip
    out.mkdir(parents=True)
    save_detection_run(out, model, card)
    return out, model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return _teacher(tmp_path_factory.mktemp("teacher") / "run", seed=0)


def _cache(teacher_run: Path, data: Path, out: Path, options: str = "") -> None:
    result = invoke("cache-teacher --teacher", teacher_run, "--data", data / "data.yaml",
                    "--out", out, "--views 3 --chunk-size 3 --seed 1", options)  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def dense(teacher: tuple, detect_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "c.zarr"
    _cache(teacher[0], detect_set, out)
    return out


@pytest.fixture(scope="module")
def top_k(teacher: tuple, detect_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("topk") / "k.zarr"
    _cache(teacher[0], detect_set, out, "--top-k 8")
    return out


def _ultralytics_view_zero(model: torch.nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The teacher's outputs on Ultralytics' own LetterBox of the file as its own loader
    reads it (cv2, BGR), turned to RGB as its trainer does: no kdpipe code in the path."""
    ultralytics()
    import cv2
    from ultralytics.data.augment import LetterBox

    bgr = cv2.imread(path)
    canvas = LetterBox(new_shape=(SIZE, SIZE), auto=False, scaleup=True, center=True)(
        labels={"img": bgr})["img"]  # fmt: skip
    image = torch.from_numpy(np.ascontiguousarray(canvas[:, :, ::-1])).permute(2, 0, 1)
    with torch.no_grad():
        return head_outputs(model, image[None].float() / 255)


def test_view_zero_holds_the_teachers_outputs_on_ultralytics_letterbox(
    dense: Path, teacher: tuple, detect_set: Path
) -> None:
    manifest = read_detection_manifest(dense)
    assert manifest.task == "detect" and manifest.num_anchors == ANCHORS
    assert manifest.strides == [8, 16, 32] and manifest.reg_max == 16
    assert manifest.image_size == SIZE and manifest.classes == CLASSES
    split = load_detection_split(detect_set / "data.yaml", "train")
    assert manifest.dataset["fingerprint"] == split.fingerprint
    cache = DetectionCache(dense, detect_set / "data.yaml")
    for row in range(len(split)):
        assert np.array_equal(cache.stored("views", row, 0), PLAIN_VIEW)
        theirs = _ultralytics_view_zero(teacher[1], split.paths[int(cache.indices[row])])
        for name in ("scores", "boxes"):
            stored = torch.from_numpy(cache.stored(name, row, 0)).float()
            torch.testing.assert_close(stored, theirs[name][0], atol=2e-2, rtol=2e-3)
    # the augmented views are other pixels: other outputs
    assert not np.array_equal(cache.stored("scores", 0, 1), cache.stored("scores", 0, 0))


def test_a_reader_batch_is_a_fresh_render_of_the_stored_views(
    dense: Path, detect_set: Path
) -> None:
    cache = DetectionCache(dense, detect_set / "data.yaml")
    split = load_detection_split(detect_set / "data.yaml", "train")
    pairs = [(0, 1), (4, 2), (7, 0), (4, 2)]
    batch = cache.batch(pairs)
    canvases, boxes = [], []
    for row, view in pairs:
        index = int(cache.indices[row])
        params = cache.stored("views", row, view)
        canvas, kept = render(read_image(split.paths[index]), split.boxes[index], params, SIZE)
        canvases.append(canvas)
        boxes.append(kept)
        np.testing.assert_array_equal(cache.ground_truth(row, view), kept)
    fresh = DetectBatch.from_views(canvases, boxes)
    assert torch.equal(batch.images, fresh.images)
    assert torch.equal(batch.bboxes, fresh.bboxes) and torch.equal(batch.cls, fresh.cls)
    assert torch.equal(batch.batch_idx, fresh.batch_idx)
    assert batch.teacher.scores.shape == (4, len(CLASSES), ANCHORS)
    assert batch.teacher.boxes.shape == (4, 64, ANCHORS) and bool(batch.teacher.stored.all())
    assert torch.equal(batch.teacher.scores[1], batch.teacher.scores[3])
    np.testing.assert_array_equal(batch.teacher.boxes[0].numpy(),
                                  cache.stored("boxes", 0, 1).astype(np.float32))  # fmt: skip


# --- a killed pass resumes to the same store ------------------------------------------------


def _command(teacher_run: Path, detect_set: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kdpipe", "cache-teacher", "--teacher", str(teacher_run),
            "--data", str(detect_set / "data.yaml"), "--out", str(out), "--views", "2",
            "--chunk-size", "1", "--batch-size", "2", "--seed", "3"]  # fmt: skip


def _store_files(out: Path) -> dict[str, bytes]:
    """Every array's chunks and metadata but the root manifest (timestamps) and the flags."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "progress"
            and str(p.relative_to(out)) != "zarr.json"}  # fmt: skip


def _flagged(out: Path) -> int:
    folder = out / "progress" / "c"
    return sum(1 for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else 0


def test_sigkill_mid_pass_then_resume_gives_the_uninterrupted_store(
    teacher: tuple, detect_set: Path, tmp_path: Path
) -> None:
    """Killed by the process itself the moment its 3rd chunk's progress flag is durable
    (``KDPIPE_TEST_KILL_AFTER``, not a timer), then run again."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, out = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    done = subprocess.run(_command(teacher[0], detect_set, reference), capture_output=True,
                          text=True, env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    killed = subprocess.run(_command(teacher[0], detect_set, out), capture_output=True, text=True,
                            env={**environment, "KDPIPE_TEST_KILL_AFTER": "chunks:3"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _flagged(out) == 3 and read_detection_manifest(out).status == "writing"
    kept = {i: (out / "scores" / "c" / str(i) / "0" / "0" / "0").stat().st_mtime_ns
            for i in range(3)}  # fmt: skip
    resumed = subprocess.run(_command(teacher[0], detect_set, out), capture_output=True,
                             text=True, env=environment)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming, 3 of 8 chunks already written" in resumed.stdout + resumed.stderr
    assert _store_files(out) == _store_files(reference)
    assert read_detection_manifest(out).cache_id == read_detection_manifest(reference).cache_id
    assert read_detection_manifest(out).status == "complete"
    for index, stamp in kept.items():  # flagged before the kill: never written again
        assert (out / "scores" / "c" / str(index) / "0" / "0" / "0").stat().st_mtime_ns == stamp


# --- verify ----------------------------------------------------------------------------------


def test_verify_passes_a_detection_cache_and_recomputes_it(
    dense: Path, top_k: Path, teacher: tuple, detect_set: Path, tmp_path: Path
) -> None:
    for store in (dense, top_k):
        report = verify_cache(store, dataset=str(detect_set / "data.yaml"), recompute=3,
                              teachers=[teacher[0]])  # fmt: skip
        assert report.ok, report.failures()
        assert {r["check"] for r in report.rows} >= {"chunks", "dataset", "recompute"}
    other, _ = _teacher(tmp_path / "other", seed=1)
    result = invoke("verify", dense, "--data", detect_set / "data.yaml", "--recompute 2",
                    "--teacher", other)  # fmt: skip
    fails(result, "is not the cache's teacher")


def test_verify_catches_a_flipped_byte_and_a_swapped_chunk(dense: Path, tmp_path: Path) -> None:
    flipped = tmp_path / "flipped.zarr"
    shutil.copytree(dense, flipped)
    chunk = flipped / "scores" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    report = verify_cache(flipped)
    assert not report.ok
    assert any("chunk 1 (rows 3-5)" in f and "checksum" in f for f in report.failures())
    swapped = tmp_path / "swapped.zarr"
    shutil.copytree(dense, swapped)
    first, second = (swapped / "boxes" / "c" / str(i) / "0" / "0" / "0" for i in (0, 1))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    report = verify_cache(swapped)  # each chunk intact (crc32c): its position digest fails
    assert not report.ok
    failures = "; ".join(report.failures())
    assert "chunk 0 (rows 0-2): boxes not what was written at chunk 0" in failures
    assert "chunk 1 (rows 3-5): boxes not what was written at chunk 1" in failures
    with pytest.raises(Exception, match="not this cache's chunk 0"):
        DetectionCache(swapped).batch([(0, 0)])


# --- top-K storage ---------------------------------------------------------------------------


def _head_bytes(store: Path) -> tuple[int, int]:
    """(bytes the head arrays hold uncompressed, bytes their chunks take on disk)."""
    manifest = read_detection_manifest(store)
    names = [n for n in array_specs(manifest) if n in ("scores", "boxes") or n.startswith("topk")]
    specs = array_specs(manifest)
    nominal = sum(int(np.prod(specs[name][0])) * np.dtype(specs[name][1]).itemsize
                  for name in names)  # fmt: skip
    disk = sum(p.stat().st_size for n in names for p in (store / n / "c").rglob("*") if p.is_file())
    return nominal, disk


def test_top_k_stores_fewer_bytes_and_the_teachers_top_k_anchors(
    dense: Path, top_k: Path, teacher: tuple, detect_set: Path
) -> None:
    (dense_nominal, dense_disk), (top_nominal, top_disk) = _head_bytes(dense), _head_bytes(top_k)
    assert top_nominal * 5 < dense_nominal and top_disk < dense_disk
    cache, full = DetectionCache(top_k), DetectionCache(dense)
    split = load_detection_split(detect_set / "data.yaml", "train")
    for row in range(len(cache)):
        anchors = cache.stored("topk_anchors", row, 0)
        assert len(set(anchors.tolist())) == 8
        # independently: the teacher's own 8 best anchors on Ultralytics' letterbox
        theirs = _ultralytics_view_zero(teacher[1], split.paths[row])["scores"][0]
        best = theirs.amax(dim=0)
        assert set(anchors.tolist()) == set(best.topk(8).indices.tolist())
        for view in range(cache.num_views):  # the same views: the dense cache's values
            anchors = cache.stored("topk_anchors", row, view).astype(np.int64)
            np.testing.assert_array_equal(cache.stored("topk_scores", row, view),
                                          full.stored("scores", row, view)[:, anchors])  # fmt: skip
    targets = cache.batch([(2, 1), (5, 0)]).teacher
    assert targets.stored.sum(dim=1).tolist() == [8, 8]
    others = ~targets.stored[:, None, :].expand_as(targets.scores)
    assert float(targets.scores[others].abs().sum()) == 0  # not stored: zeros
    anchors = torch.from_numpy(cache.stored("topk_anchors", 2, 1).astype(np.int64))
    stored = torch.from_numpy(cache.stored("topk_boxes", 2, 1)).float()
    torch.testing.assert_close(targets.boxes[0][:, anchors], stored)


# --- caches and lineage ----------------------------------------------------------------------


def test_caches_and_lineage_show_a_detection_cache(
    dense: Path, top_k: Path, teacher: tuple, tmp_path: Path
) -> None:
    table = catalog([dense.parent, top_k.parent]).set_index("path")
    assert table.loc[str(dense), "task"] == "detect" and table.loc[str(dense), "storage"] == "dense"
    assert table.loc[str(top_k), "storage"] == "top-8 anchors"
    assert table.loc[str(dense), "samples"] == 8 and table.loc[str(dense), "views"] == 3
    assert table.loc[str(dense), "teachers"].startswith("yolo11n.yaml@")
    # a student's card records the cache it learned from, as the detection trainer writes it
    model, _ = load_detection_run(teacher[0])
    learned = {"cache_id": read_detection_manifest(dense).cache_id, "cache_path": str(dense)}
    student = card_for(model, kind="student", classes=CLASSES, image_size=SIZE,
                       source={"kind": "test"}, lineage=learned)  # fmt: skip
    (tmp_path / "student").mkdir()
    save_detection_run(tmp_path / "student", model, student)
    links = lineage(tmp_path / "student")
    assert links["link"].tolist() == ["student", "cache", "teacher", "dataset"]
    assert links["status"].tolist() == ["verified"] * 4, links.to_string()


# --- bad inputs between the two tasks -------------------------------------------------------


def test_a_classification_teacher_with_a_data_yaml_is_one_line(
    teacher_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    result = invoke("cache-teacher --temperature 2 --teacher", teacher_run, "--data",
                    detect_set / "data.yaml", "--out", tmp_path / "c.zarr")  # fmt: skip
    fails(result, "is a YOLO detection data YAML but")
    assert not (tmp_path / "c.zarr").exists()


def test_a_detection_teacher_with_an_image_folder_or_a_named_set_is_one_line(
    teacher: tuple, detect_set: Path, tmp_path: Path
) -> None:
    before = snapshot(detect_set)
    for data in (detect_set / "images", "synthetic"):
        result = invoke("cache-teacher --teacher", teacher[0], "--data", data, "--out",
                        tmp_path / "c.zarr")  # fmt: skip
        fails(result, "is a detection teacher: --data must be a YOLO data YAML")
    # a classification-only option is named, not ignored
    result = invoke("cache-teacher --temperature 2 --augment crop-flip --teacher", teacher[0],
                    "--data", detect_set / "data.yaml", "--out", tmp_path / "c.zarr")  # fmt: skip
    fails(result, "--temperature, --augment: not an option of a detection teacher's cache", 2)
    assert not (tmp_path / "c.zarr").exists() and snapshot(detect_set) == before
    result = invoke("cache-teacher --data synthetic --teacher", teacher[0], "--teacher",
                    teacher[0], "--out", tmp_path / "c.zarr")  # fmt: skip
    fails(result, "a detection cache has one teacher")


def test_a_classification_teacher_still_needs_its_temperature(
    teacher_run: Path, tmp_path: Path
) -> None:
    result = invoke("cache-teacher --data synthetic --teacher", teacher_run, "--out",
                    tmp_path / "c.zarr")  # fmt: skip
    fails(result, "Missing option '--temperature'", 2)
    assert not (tmp_path / "c.zarr").exists()


def test_each_task_refuses_the_other_tasks_cache(
    dense: Path, train_cache: Path, teacher: tuple, detect_set: Path, tmp_path: Path
) -> None:
    with pytest.raises(CacheMismatchError, match=r"is a classification cache .*not a detection"):
        DetectionCache(train_cache, detect_set / "data.yaml")
    with pytest.raises(CacheMismatchError, match=r"is a detection cache .*not a classifier's"):
        load_soft_labels(dense)
    result = invoke("train-student --model kd_mlp_30x2 --data synthetic --epochs 1 --alpha 0.5 "
                    "--cache", dense, "--out", tmp_path / "s")  # fmt: skip
    fails(result, "is a detection cache (a YOLO teacher's head outputs)")
    assert not (tmp_path / "s").exists()
    # a detection pass onto a classification cache's path: another cache, named
    target = tmp_path / "cls.zarr"
    shutil.copytree(train_cache, target)
    before = snapshot(target)
    result = invoke("cache-teacher --teacher", teacher[0], "--data", detect_set / "data.yaml",
                    "--out", target)  # fmt: skip
    fails(result, "a classification cache, not a detection cache")
    assert snapshot(target) == before


def test_a_detection_cache_read_with_other_data_is_one_line(dense: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_detect_folder(other, {"train": 8, "val": 2, "test": 2}, source="synthetic",
                        recipe=DetectRecipe(seed=5), log=lambda line: None)  # fmt: skip
    with pytest.raises(CacheMismatchError, match=r"was made from .*other images or labels"):
        DetectionCache(dense, other / "data.yaml")
    result = invoke("verify", dense, "--data", other / "data.yaml")
    fails(result, "other images or labels")
