"""Detection data (issue 25, part 1): the YOLO-format set kdpipe builds, and how a data
YAML, its image folders and label files are read, checked and fingerprinted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fails, invoke
from kdpipe.base.errors import DatasetError
from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder
from kdpipe.data.yolo import label_file, load_detection_split, read_data_yaml, read_labels
from PIL import Image

COUNTS = {"train": 12, "val": 4, "test": 4}


def _build(out: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> dict:
    return build_detect_folder(out, counts, source="synthetic", recipe=DetectRecipe(seed=seed),
                               log=lambda line: None)  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def detect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "set"
    _build(out)
    return out


def test_the_detection_set_is_rebuilt_bit_identically(detect_set: Path, tmp_path: Path) -> None:
    again = _build(tmp_path / "again")
    assert json.loads((detect_set / "RECIPE.json").read_text()) == again
    assert _files(detect_set) == _files(tmp_path / "again")
    # a smaller set is the larger one's first canvases, byte for byte
    _build(tmp_path / "small", {"train": 5, "val": 2, "test": 2})
    small = _files(tmp_path / "small")
    full = _files(detect_set)
    assert all(full[name] == data for name, data in small.items() if "/" in name)
    assert _build(tmp_path / "other", seed=1)["files_sha256"] != again["files_sha256"]


def test_every_canvas_holds_one_to_four_garments_with_their_boxes(detect_set: Path) -> None:
    data = read_data_yaml(detect_set / "data.yaml")
    assert set(data.splits) == {"train", "val", "test"} and len(data.names) == 5
    sizes = set()
    for split, count in COUNTS.items():
        loaded = load_detection_split(data, split)
        assert len(loaded) == count and loaded.without_labels == 0
        for path, boxes in zip(loaded.paths, loaded.boxes, strict=True):
            with Image.open(path) as image:
                assert image.mode == "RGB" and 128 <= min(image.size) <= max(image.size) <= 192
                sizes.add(image.size)
            assert 1 <= len(boxes) <= 4
            classes, centre, extent = boxes[:, 0], boxes[:, 1:3], boxes[:, 3:]
            assert np.all(classes == classes.astype(int)) and np.all(classes < 5)
            assert np.all(centre - extent / 2 >= -1e-6) and np.all(centre + extent / 2 <= 1 + 1e-6)
    assert len(sizes) > 5  # drawn per canvas, not square


def test_the_box_covers_the_garment_drawn(tmp_path: Path) -> None:
    """A canvas drawn on a flat background of one colour would hide nothing: check on the
    real recipe that the pixels outside every box stay near the background's texture, by
    comparing the mean absolute difference from the canvas median inside and outside."""
    _build(tmp_path / "s", {"train": 6, "val": 1, "test": 1})
    loaded = load_detection_split(tmp_path / "s" / "data.yaml", "train")
    inside_more = 0
    for path, boxes in zip(loaded.paths, loaded.boxes, strict=True):
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float64)
        height, width = pixels.shape[:2]
        mask = np.zeros((height, width), bool)
        for _, cx, cy, w, h in boxes:
            mask[int((cy - h / 2) * height) : int(np.ceil((cy + h / 2) * height)),
                 int((cx - w / 2) * width) : int(np.ceil((cx + w / 2) * width))] = True  # fmt: skip
        deviation = np.abs(pixels - np.median(pixels[~mask], axis=0)).mean(axis=2)
        inside_more += deviation[mask].mean() > deviation[~mask].mean()
    assert inside_more == len(loaded)


def test_the_fingerprint_covers_images_and_labels(detect_set: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(detect_set, copy)
    base = load_detection_split(copy / "data.yaml", "train").fingerprint
    assert base == load_detection_split(detect_set / "data.yaml", "train").fingerprint
    label = copy / "labels" / "train" / "000003.txt"
    label.write_text(label.read_text().replace("0.", "0.0", 1))  # the same box, other bytes
    edited = load_detection_split(copy / "data.yaml", "train").fingerprint
    assert edited["sha256"] != base["sha256"]
    label.unlink()  # an image without labels: a background image, counted, and another set
    without = load_detection_split(copy / "data.yaml", "train")
    assert without.without_labels == 1 and len(without.boxes[3]) == 0
    assert without.fingerprint["sha256"] not in (base["sha256"], edited["sha256"])


def test_names_with_tabs_and_newlines_cannot_forge_a_fingerprint(tmp_path: Path) -> None:
    """The digest's framing is JSON lines: a name holding the separators of a naive
    ``path\\tsha\\n`` framing is still one name."""
    for name, files in (("a", ["x.png"]), ("b", ["x.png\tfake\nx.png"])):
        (tmp_path / name / "images" / "train").mkdir(parents=True)
        (tmp_path / name / "labels" / "train").mkdir(parents=True)
        for file in files:
            Image.new("RGB", (8, 8)).save(tmp_path / name / "images" / "train" / file, "PNG")
            stem = file.rsplit(".", 1)[0]
            (tmp_path / name / "labels" / "train" / f"{stem}.txt").write_text("0 .5 .5 .5 .5\n")
        (tmp_path / name / "data.yaml").write_text("train: images/train\nnames: [thing]\n")
    first = load_detection_split(tmp_path / "a" / "data.yaml", "train").fingerprint
    second = load_detection_split(tmp_path / "b" / "data.yaml", "train").fingerprint
    assert first["sha256"] != second["sha256"]


def test_ultralytics_rule_for_the_label_file() -> None:
    assert label_file("/d/images/train/a.b.jpg") == "/d/labels/train/a.b.txt"
    assert label_file("/images/x/images/train/a.png") == "/images/x/labels/train/a.txt"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("5 0.5 0.5 0.2 0.2", "class id 5 is outside 0..4"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1 is outside 0..4"),
        ("1.5 0.5 0.5 0.2 0.2", "class id 1.5 is outside 0..4"),
        ("1 0.5 1.5 0.2 0.2", "coordinates must be normalised to [0, 1], found 0.5 1.5 0.2 0.2"),
        ("1 40 50 20 20", "coordinates must be normalised to [0, 1]"),
        ("1 0.5 0.5 nan 0.2", "coordinates must be normalised"),
        ("1 0.5 0.5 0.2", "expected 5 values (class cx cy w h), found 4"),
        (
            "1 0.5 0.5 0.2 0.2 0.1 0.1",
            "expected 5 values (class cx cy w h), found 7 (segments and keypoints are not "
            "supported)",
        ),
        ("a b c d e", "not numbers"),
        ("1 0.5 0.5 0 0.2", "a box of zero width or height"),
    ],
)
def test_a_bad_label_line_is_one_error_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "x.txt"
    path.write_text(f"0 0.5 0.5 0.1 0.1\n\n{line}\n")
    with pytest.raises(DatasetError) as caught:
        read_labels(str(path), 5)
    assert f"label file {path}, line 3: {message}" in str(caught.value)


def test_bad_data_yamls_are_one_line(detect_set: Path, tmp_path: Path) -> None:
    def check(text: str, message: str) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(DatasetError) as caught:
            read_data_yaml(path)
        assert message in str(caught.value) and "\n" not in str(caught.value)

    root = f"path: {detect_set}\n"
    check(root + "train: images/nothing\nnames: [a]\n", "the train folder")
    check(root + "train: images/train\nval: images/none\nnames: [a]\n", "the val folder")
    check(root + "val: images/val\nnames: [a]\n", "names no train folder")
    check(root + "train: images/train\n", "has no 'names'")
    check(root + "train: images/train\nnames: {0: a, 2: b}\n", "'names' must be a list")
    check(root + "train: images/train\nnames: [a, b]\nnc: 3\n", "nc is 3 but names lists 2")
    check(root + "train: [images/train, images/val]\nnames: [a]\n", "must be one folder")
    check("train: [unclosed\n", "is not valid YAML (line")
    check("- a\n- b\n", "a data YAML is a mapping")
    with pytest.raises(DatasetError, match="cannot read data YAML"):
        read_data_yaml(tmp_path / "absent.yaml")
    labels = detect_set / "labels"
    moved = detect_set / "labels-aside"
    labels.rename(moved)
    try:
        with pytest.raises(DatasetError, match=r"no image of .* has a label file"):
            load_detection_split(detect_set / "data.yaml", "train")
    finally:
        moved.rename(labels)


def test_detect_folder_cli_keeps_what_it_did_not_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detect-folder asks the one output guard: a folder of the user's, the working
    directory (empty, it was written into: make faults' guard sweep) and a JPEG folder
    of jpeg-folder are each refused, with or without --overwrite."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    fails(invoke("detect-folder --dest", tmp_path / "mine"), "pass --overwrite")
    fails(invoke("detect-folder --overwrite --dest", tmp_path / "mine"),
          "is not a detection set (detect-folder) kdpipe wrote")  # fmt: skip
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "mine"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for overwrite in ("", "--overwrite"):
        fails(invoke(f"detect-folder {overwrite} --data-root", tmp_path / "nothing", "--dest ."),
              "--dest . is the working directory")  # fmt: skip
    assert not any((tmp_path / "here").iterdir())
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    (jpegs / "RECIPE.json").write_text('{"recipe": {}, "files_sha256": "0"}')
    fails(invoke("detect-folder --overwrite --dest", jpegs), "is not a detection set")
    fails(invoke("detect-folder --data-root", tmp_path / "nothing", "--dest", tmp_path / "f"),
          "is missing: run 'make data'")  # fmt: skip
