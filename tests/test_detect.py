"""The detection room (issue 25, part 2): Ultralytics behind one door, YOLO teachers trained
by its own trainer or imported from its own checkpoints, as kdpipe run directories."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails, invoke, snapshot
from kdpipe.base.errors import KdpipeError, ModelError, RunDirError
from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder

if importlib.util.find_spec("ultralytics") is None:  # not imported: kdpipe's door does it
    pytest.skip("the detect extra: pip install 'kdpipe[detect]'", allow_module_level=True)

from kdpipe.tasks.detect.runs import (
    DetectionTeacherConfig,
    load_detection_run,
    train_detection_teacher,
)
from kdpipe.tasks.detect.yolo import head_outputs, load_checkpoint, ultralytics

SIZE = 64


@pytest.fixture(scope="module")
def detect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "set"
    build_detect_folder(out, {"train": 16, "val": 4, "test": 4}, source="synthetic",
                        recipe=DetectRecipe(), log=lambda line: None)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ultralytics_checkpoint(detect_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by Ultralytics' own trainer, as a user has one (best.pt)."""
    project = tmp_path_factory.mktemp("ultralytics")
    ultralytics()  # offline, kdpipe's settings folder
    from ultralytics import YOLO

    YOLO("yolo11n.yaml").train(data=str(detect_set / "data.yaml"), epochs=1, imgsz=SIZE,
                               batch=8, workers=0, amp=False, plots=False, device="cpu",
                               project=str(project), name="t", exist_ok=True, seed=0,
                               verbose=False)  # fmt: skip
    return project / "t" / "weights" / "best.pt"


def test_an_imported_checkpoint_computes_what_ultralytics_own_loader_computes(
    ultralytics_checkpoint: Path, tmp_path: Path
) -> None:
    from ultralytics import YOLO

    run = tmp_path / "teacher"
    done = invoke("import-teacher", f"ultralytics:{ultralytics_checkpoint}", "--out", run)
    assert done.exit_code == 0, done.output
    assert "detection teacher yolo11n.yaml from ultralytics:" in done.output
    assert "5 classes, 64 px, strides [8, 16, 32], reg_max 16" in done.output
    model, card = load_detection_run(run)
    assert card.task == "detect" and card.kind == "teacher" and card.architecture == "yolo11n.yaml"
    assert card.num_classes == 5 and card.classes == ["a", "b", "c", "d", "e"]
    assert card.strides == [8, 16, 32] and card.reg_max == 16 and card.image_size == SIZE
    assert card.source["kind"] == "ultralytics-checkpoint" and not card.end2end
    theirs = YOLO(str(ultralytics_checkpoint)).model.float().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours, reference = head_outputs(model, images), head_outputs(theirs, images)
    assert ours["scores"].shape == (2, 5, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2)
    for name in ("boxes", "scores"):
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5)


def test_a_teacher_trained_by_ultralytics_trainer_is_a_run_directory(
    detect_set: Path, tmp_path: Path
) -> None:
    before = snapshot(detect_set / "images")
    out = tmp_path / "t"
    done = invoke("train-teacher --model yolo11n.yaml --data", detect_set / "data.yaml",
                  "--epochs 1 --image-size 64 --batch-size 8 --device cpu --out", out)  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "teacher yolo11n.yaml, weights" in done.output
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors",
                                                     "ultralytics"]  # fmt: skip
    assert (out / "ultralytics" / "results.csv").is_file()
    _, card = load_detection_run(out)
    assert card.source["kind"] == "ultralytics-train" and card.dataset["split"] == "train"
    assert card.dataset["fingerprint"]["count"] == 16
    assert snapshot(detect_set / "images") == before  # the images are never written
    # the card binds the weights: an edited model.json is refused
    record = json.loads((out / "model.json").read_text())
    record["image_size"] = 320
    (out / "model.json").write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="changed since the weights were written"):
        load_detection_run(out)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": subprocess.Popen}, path)  # a global no weights-only reader allows
    with pytest.raises(ModelError, match="without running code from it"):
        load_checkpoint(path)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ModelError, match=r"text\.pt is not an Ultralytics checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "linear.pt")
    with pytest.raises(ModelError, match="holds no Ultralytics detection model"):
        load_checkpoint(tmp_path / "linear.pt")
    with pytest.raises(ModelError, match="no Ultralytics checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_classification_run_is_not_a_detection_model(teacher_run: Path) -> None:
    with pytest.raises(RunDirError, match="is a classification run, not a detection model"):
        load_detection_run(teacher_run)


def test_bad_detection_teacher_options_are_refused_before_anything_is_written(
    detect_set: Path, tmp_path: Path
) -> None:
    def config(**changes: object) -> DetectionTeacherConfig:
        base = dict(model="yolo11n.yaml", data=str(detect_set / "data.yaml"),
                    out=str(tmp_path / "t"), epochs=1, image_size=SIZE)  # fmt: skip
        return DetectionTeacherConfig(**{**base, **changes})

    with pytest.raises(KdpipeError, match="multiple of 32"):
        train_detection_teacher(config(image_size=100))
    with pytest.raises(KdpipeError, match="an Ultralytics model YAML"):
        train_detection_teacher(config(model="resnet18"))
    with pytest.raises(KdpipeError, match="cannot read data YAML"):
        train_detection_teacher(config(data=str(tmp_path / "x.yaml")))
    data = detect_set / "data.yaml"
    start = f"--data {data} --epochs 1 --out {tmp_path / 't'}"
    fails(invoke("train-teacher --model resnet18", start), "an Ultralytics model YAML")
    fails(invoke("train-teacher --model yolo11n.yaml --jitter 2", start),
          "--jitter does not apply to a detection teacher")  # fmt: skip
    fails(invoke("train-teacher --model yolo11n.yaml --data", data, "--out", tmp_path / "t"),
          "Missing option --epochs for a detection teacher")  # fmt: skip
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, checkpoint)
    out = f"--out {tmp_path / 't'}"
    fails(invoke("import-teacher", f"ultralytics:{checkpoint}", out, "--classes", checkpoint),
          "--classes does not apply to an Ultralytics checkpoint")  # fmt: skip
    fails(invoke("import-teacher", f"ultralytics:{checkpoint}", out, "--input-size 100"),
          "must be a multiple of 32")  # fmt: skip
    fails(invoke("import-teacher ultralytics:", out), "needs the checkpoint's path")
    fails(invoke("import-teacher", f"ultralytics:{checkpoint}", out),
          "holds no Ultralytics detection model")  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_without_the_extra_detection_is_one_line_naming_it() -> None:
    """The core never needs Ultralytics; the detection room says how to install it."""
    code = (
        "import sys; sys.modules['ultralytics'] = None\n"
        "from kdpipe.tasks.detect.yolo import ultralytics\n"
        "try:\n    ultralytics()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.startswith("KdpipeError detection needs the optional extra: "
                                    "pip install 'kdpipe[detect]'")  # fmt: skip
    assert "AGPL-3.0" in result.stdout


# --- views: stored parameters, one renderer ---------------------------------------------------


def test_view_zero_is_ultralytics_letterbox_of_image_and_boxes() -> None:
    """Pixels and boxes of the plain view against Ultralytics' own LetterBox run on its own
    label format (Instances), an independent path for the boxes."""
    from kdpipe.tasks.detect.views import PLAIN_VIEW, render

    ultralytics()  # through kdpipe's door: Pillow and torch stay as they were
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.instance import Instances

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    boxes = np.array([[1, 0.3, 0.4, 0.2, 0.3], [3, 0.7, 0.6, 0.3, 0.5]], np.float32)
    canvas, rendered = render(image, boxes, PLAIN_VIEW, SIZE)
    instances = Instances(boxes[:, 1:].copy(), bbox_format="xywh", normalized=True)
    labels = {"img": image.copy(), "cls": boxes[:, :1], "instances": instances}
    theirs = LetterBox(new_shape=(SIZE, SIZE), auto=False, scaleup=True, center=True)(labels)
    np.testing.assert_array_equal(canvas, theirs["img"])
    instances = theirs["instances"]
    instances.convert_bbox("xywh")
    np.testing.assert_allclose(rendered[:, 1:] * SIZE, instances.bboxes, atol=1e-3)


def test_a_stored_view_renders_the_same_pixels_and_boxes_twice_and_boxes_follow_pixels() -> None:
    from kdpipe.tasks.detect.views import DetectAugment, draw_views, render

    image = np.zeros((100, 160, 3), np.uint8)
    image[20:60, 30:70] = 255  # one white object; its box is exactly its pixels
    boxes = np.array([[0, 50 / 160, 40 / 100, 40 / 160, 40 / 100]], np.float32)
    augment = DetectAugment(hsv_h=0, hsv_s=0, hsv_v=0)
    views = draw_views(np.array([0, 7]), 6, seed=3, augment=augment)
    assert np.array_equal(views[:, 0], [[1, 0, 0, 0, 0, 1, 1]] * 2)
    # row 7's views are its own, whichever rows are drawn with it
    assert np.array_equal(draw_views(np.array([7]), 6, 3, augment)[0], views[1])
    assert len({tuple(v) for v in views[1]}) == 6 and views[1, 1:, 3].sum() >= 1
    checked = 0
    for view in views[1]:
        canvas, out = render(image, boxes, view, SIZE)
        again = render(image, boxes, view, SIZE)
        assert np.array_equal(canvas, again[0]) and np.array_equal(out, again[1])
        white = np.argwhere(canvas.min(axis=2) > 128)
        if len(out) == 0:
            continue
        _, cx, cy, w, h = out[0] * [1, SIZE, SIZE, SIZE, SIZE]
        y0, x0 = white.min(axis=0)
        y1, x1 = white.max(axis=0) + 1
        np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                                   [x0, y0, x1, y1], atol=1.5)  # fmt: skip
        checked += 1
    assert checked >= 4


def test_importing_the_detect_room_leaves_pillow_and_torch_as_they_were() -> None:
    """Ultralytics rebinds Image.open (a pip check on every unreadable file) and torch.save
    on import; after kdpipe's door they are the libraries' own again."""
    script = ("from PIL import Image; import torch\n"
              "before = (Image.open, torch.save)\n"
              "from kdpipe.tasks.detect.yolo import ultralytics; ultralytics()\n"
              "import ultralytics.utils.patches\n"
              "print((Image.open, torch.save) == before)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"YOLO_CONFIG_DIR": tempfile.mkdtemp()})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"


# --- the batch contract every detection source gives the trainer -------------------------------


def test_a_batch_from_rendered_views_and_head_outputs_has_ultralytics_keys() -> None:
    from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
    from kdpipe.tasks.detect.views import PLAIN_VIEW, render

    image = np.full((40, 60, 3), 90, np.uint8)
    boxes = np.array([[2, 0.5, 0.5, 0.4, 0.4], [0, 0.2, 0.3, 0.2, 0.2]], np.float32)
    views = [render(image, boxes, PLAIN_VIEW, SIZE), render(image, boxes[:0], PLAIN_VIEW, SIZE)]
    head = {"scores": torch.zeros(2, 3, 84), "boxes": torch.zeros(2, 64, 84)}
    batch = DetectBatch.from_views([c for c, _ in views], [b for _, b in views],
                                   TeacherTargets.from_head(head))  # fmt: skip
    assert batch.images.shape == (2, 3, SIZE, SIZE) and float(batch.images.max()) <= 1.0
    assert batch.batch_idx.tolist() == [0.0, 0.0] and batch.cls[:, 0].tolist() == [2.0, 0.0]
    assert set(batch.ultralytics_batch()) == {"batch_idx", "cls", "bboxes"}
    assert batch.teacher.reg_max == 16 and bool(batch.teacher.stored.all())
    with pytest.raises(KdpipeError, match="do not match its scores"):
        TeacherTargets.from_head({"scores": torch.zeros(2, 3, 84), "boxes": torch.zeros(2, 64, 80)})
