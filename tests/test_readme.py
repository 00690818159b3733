"""The README's quickstart and the guide's path for a new user, run as they are written.

The commands come from README.md and docs/guide.md themselves (the block after the marker
below), so that the test fails when the docs drift from what kdpipe does. A timm model's
weights saved to files stand in for a download; the image folder is small and made here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import fails, invoke
from kdpipe.cache import read_manifest
from kdpipe.models.runs import read_card
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"
GUIDE = README.parent / "docs" / "guide.md"
MARKER = "<!-- tests/test_readme.py runs the next block"
CLASSES = ("ant", "bee", "cat")


def readme_commands(page: Path = README, marker: str = MARKER) -> list[str]:
    """The kdpipe commands of the page's marked block: continuation lines joined, comments
    dropped; any other line is an error (the block is a script a user pastes)."""
    text = page.read_text()
    assert marker in text, f"{page.name} lost the marked block of the new user's path"
    block = re.search(r"```bash\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    assert block is not None
    joined = block.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert line.startswith("kdpipe "), f"not a kdpipe command: {line}"
        commands.append(line)
    return commands


def stage(command: str) -> str:
    """``import-teacher timm:`` and so on: the command, and a SOURCE's kind."""
    words = shlex.split(command)
    return " ".join(words[1:3]) if words[1] == "import-teacher" else words[1]


def new_users_files(folder: Path) -> None:
    """What the README's commands expect in the current folder: ``my_images`` (train and
    test class folders of 24 x 24 PNGs), a fine-tuned 3-class resnet10t checkpoint as a
    training script saves it (nested, DDP prefixes), its class names, and timm's
    resnet10t with its 1000-class ImageNet head as safetensors (a download's stand-in)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for index, name in enumerate(CLASSES):
            (folder / "my_images" / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                pixels[..., index] = 255  # one colour channel per class: learnable
                Image.fromarray(pixels).save(folder / "my_images" / split / name / f"{i}.png")
    torch.manual_seed(0)
    fine_tuned = timm.create_model("resnet10t", num_classes=len(CLASSES)).state_dict()
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in fine_tuned.items()}},
               folder / "my_teacher.pth")  # fmt: skip
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    imagenet = timm.create_model("resnet10t").state_dict()
    safetensors.torch.save_file(imagenet, str(folder / "resnet10t.safetensors"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty hub cache: the weights files are the only weights."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_the_readmes_quickstart_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten lines at the top of README.md: your own weights for a timm architecture, the
    cache, a student, its evaluation, an int8 file; no decode option repeated."""
    commands = readme_commands()
    assert [stage(c) for c in commands] == [
        "import-teacher timm:resnet10t", "cache-teacher", "train-student", "evaluate", "export",
    ]  # fmt: skip
    assert len(README.read_text().split(MARKER)[1].split("```")[1].splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    new_users_files(tmp_path)
    for command in commands:
        result = invoke(command.removeprefix("kdpipe "))
        assert result.exit_code == 0, f"{command}\n{result.output}"
    runs = tmp_path / "runs"
    manifest = read_manifest(runs / "t.zarr")
    assert manifest.teachers[0].weights_sha256 == read_card(runs / "teacher").weights_sha256
    assert read_card(runs / "student").lineage["cache_id"] == manifest.cache_id
    assert (runs / "student.int8.onnx").exists()


def test_the_guides_new_user_path_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = readme_commands(GUIDE)
    # the path of acceptance 1, in this order: a pretrained timm teacher, its cache, a
    # student, its evaluation, a table
    assert [stage(c) for c in commands] == [
        "import-teacher timm:resnet10t", "train-teacher", "cache-teacher", "train-student",
        "evaluate", "cache-teacher", "report",
    ]  # fmt: skip
    assert "--pretrained timm:resnet10t --weights" in commands[1]
    monkeypatch.chdir(tmp_path)
    new_users_files(tmp_path)
    outputs = []
    for command in commands:
        result = invoke(command.removeprefix("kdpipe "))
        assert result.exit_code == 0, f"{command}\n{result.output}"
        outputs.append(result.output)
    runs = tmp_path / "runs"
    teacher = read_card(runs / "teacher")
    assert teacher.source["source"] == "timm:resnet10t" and teacher.classes == list(CLASSES)
    assert teacher.data_config["input_size"] == [3, 176, 176]  # the weights' own size
    tuned = read_card(runs / "teacher-ft")  # ImageNet's 1000 classes, given a 3-class head
    assert tuned.num_classes == 3 and tuned.source["weights_file"] == "resnet10t.safetensors"
    manifest = read_manifest(runs / "t.zarr")
    assert manifest.status == "complete" and manifest.num_samples == 9
    assert manifest.teachers[0].weights_sha256 == teacher.weights_sha256
    student = read_card(runs / "student")
    assert student.lineage["cache_id"] == manifest.cache_id
    assert student.data_config["input_size"] == [3, 24, 24]  # its own size, not the teacher's
    evaluation = outputs[4]
    assert "teacher_agreement" in evaluation and "accuracy" in evaluation
    table = outputs[6]
    assert "| student " in table and "| teacher-test " in table and "resnet10t" in table
    # the other start the block names: the fine-tuned teacher in place of runs/teacher
    for command in commands[2:5]:
        command = re.sub(r"runs/teacher\b(?!-)", "runs/teacher-ft", command)
        command = command.replace("runs/t.zarr", "runs/t-ft.zarr")
        command = re.sub(r"runs/student\b", "runs/student-ft", command)
        result = invoke(command.removeprefix("kdpipe "))
        assert result.exit_code == 0, f"{command}\n{result.output}"
    assert read_manifest(runs / "t-ft.zarr").teachers[0].weights_sha256 == tuned.weights_sha256
    assert read_card(runs / "student-ft").lineage["teacher_runs"] == ["runs/teacher-ft"]


def test_report_names_what_to_do_with_an_imported_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An imported teacher has no config.json or metrics.csv: report says so in one line and
    gives the command whose cache is its row, instead of 'not a kdpipe run directory'."""
    monkeypatch.chdir(tmp_path)
    new_users_files(tmp_path)
    made = invoke("import-teacher timm:resnet10t --weights my_teacher.pth --out runs/teacher")
    assert made.exit_code == 0, made.output
    result = invoke("report runs/teacher")
    fails(result, "runs/teacher is a teacher imported from timm:resnet10t (import-teacher)")
    assert "kdpipe cache-teacher --teacher runs/teacher --data DATA --split test" in result.output
    assert not (tmp_path / "runs" / "teacher" / "config.json").exists()
    assert json.loads((tmp_path / "runs" / "teacher" / "model.json").read_text())["source"]


DETECTION_MARKER = MARKER + " (detection)"


def test_the_readmes_detection_path_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's detection block on a tiny YOLO-format set made here (8 training images),
    each command as written but with one epoch: a teacher by Ultralytics' own trainer, its
    cache, a student from the cache alone, mAP, an int8 file."""
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("the detect extra: pip install 'kdpipe[detect]'")
    from kdpipe.cache import Location, open_complete
    from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder
    from kdpipe.tasks.detect.runs import read_detection_card

    commands = readme_commands(README, DETECTION_MARKER)
    assert [stage(c) for c in commands] == [
        "train-teacher", "cache-teacher", "train-student", "evaluate", "export",
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    counts = {"train": 8, "val": 4, "test": 4}
    build_detect_folder(tmp_path / "my_set", counts, source="synthetic", recipe=DetectRecipe(),
                        log=lambda line: None)  # fmt: skip
    for command in commands:
        command = re.sub(r"--epochs \d+", "--epochs 1", command)
        result = invoke(command.removeprefix("kdpipe "))
        assert result.exit_code == 0, f"{command}\n{result.output}"
    runs = tmp_path / "runs"
    manifest = open_complete(Location(runs / "yolo.zarr"), detection=True)[0]
    assert manifest.storage["kind"] == "top-k" and manifest.num_views == 4
    assert manifest.teacher["weights_sha256"] == read_detection_card(runs / "yolo-t").weights_sha256
    student = read_detection_card(runs / "yolo-s")
    assert student.lineage["cache_id"] == manifest.cache_id and student.source["kind"] == "cache"
    assert (runs / "yolo-s.int8.onnx").exists()
