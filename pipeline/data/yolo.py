"""Detection datasets in Ultralytics' YOLO format: a data YAML, image folders, label files.

A data YAML names ``train``/``val``/``test`` image folders (relative to its ``path:`` key,
else to the YAML's own folder) and the class ``names``. The labels of an image are the
text file Ultralytics would read (:func:`label_file`: the last ``images`` folder of the
path becomes ``labels``, the extension ``.txt``), one ``class cx cy w h`` line per object,
normalised to [0, 1]. An image without a label file is an image with no objects
(Ultralytics' rule: a background image); an empty file says the same.

A split's *index* is, per image in canonical order (path relative to the split's image
folder), the image's SHA-256, its label file's SHA-256 (or none) and its boxes; the
fingerprint is a SHA-256 over JSON lines of those, so a name holding a tab or a newline
cannot make two sets alike, and an edited label file is a changed dataset as surely as an
edited image. Every bad label is one error naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kdpipe.base.errors import DatasetError
from kdpipe.data.imagefolder import file_digest, image_files, relative_path

SPLITS = ("train", "val", "test")
FINGERPRINT_TAG = "kdpipe yolo detection index 1"


@dataclass(frozen=True)
class DetectionData:
    """A data YAML, read and checked: where each split's images are, and the class names."""

    yaml_file: Path
    root: Path
    splits: dict[str, Path]  # split -> its image folder (only the splits the YAML names)
    names: tuple[str, ...]


def is_data_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _names(value: object, yaml_file: Path) -> tuple[str, ...]:
    """``names`` as a list, or as a mapping {0: name, ...} with ids 0..nc-1."""
    if isinstance(value, list) and value and all(isinstance(n, str) for n in value):
        return tuple(value)
    if isinstance(value, dict) and value:
        try:
            ids = sorted(int(key) for key in value)
        except (TypeError, ValueError):
            ids = []
        if ids == list(range(len(value))):
            by_id = {int(key): name for key, name in value.items()}
            if all(isinstance(name, str) for name in by_id.values()):
                return tuple(by_id[i] for i in ids)
    raise DatasetError(f"{yaml_file}: 'names' must be a list of class names or a mapping "
                       f"0..N-1 -> name, not {value!r}")  # fmt: skip


def read_data_yaml(path: str | Path) -> DetectionData:
    """The data YAML at ``path``, each named split's folder checked to exist. ``download:``
    is ignored: kdpipe never fetches a dataset from a YAML."""
    import yaml

    yaml_file = Path(path)
    try:
        record = yaml.safe_load(yaml_file.read_text())
    except OSError as exc:
        raise DatasetError(f"cannot read data YAML {yaml_file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise DatasetError(f"{yaml_file} is not valid YAML{line}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{yaml_file}: a data YAML is a mapping with train/val/test and "
                           "names")  # fmt: skip
    if "names" not in record:
        raise DatasetError(f"{yaml_file} has no 'names' (the class names)")
    names = _names(record["names"], yaml_file)
    if "nc" in record and record["nc"] != len(names):
        raise DatasetError(f"{yaml_file}: nc is {record['nc']} but names lists {len(names)}")
    base = record.get("path")
    root = yaml_file.parent if base in (None, "") else yaml_file.parent / str(base)
    splits = {}
    for split in SPLITS:
        value = record.get(split)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise DatasetError(
                f"{yaml_file}: '{split}' must be one folder of images (lists of folders "
                f"and .txt file lists are not supported): {value!r}"
            )
        folder = root / value
        if not folder.is_dir():
            raise DatasetError(f"{yaml_file}: the {split} folder {folder} does not exist")
        splits[split] = folder
    if "train" not in splits:
        raise DatasetError(f"{yaml_file} names no train folder")
    return DetectionData(yaml_file, root, splits, names)


def label_file(image: str) -> str:
    """Ultralytics' rule (``img2label_paths``): ``.../images/x/a.jpg`` -> ``.../labels/x/a.txt``."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return labels.join(image.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt"


def read_labels(path: str, num_classes: int) -> np.ndarray:
    """The boxes of one label file, ``(n, 5)`` float32 rows ``class cx cy w h``; a missing
    file is no boxes. Each bad line is an error naming the file and the line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return np.zeros((0, 5), np.float32)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read label file {path}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"label file {path}, line {number}"
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: expected 5 values (class cx cy w h), found {len(fields)} "
                "(segments and keypoints are not supported)"
            )
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise DatasetError(f"{where}: not numbers: {line.strip()!r}") from None
        class_id = values[0]
        if class_id != int(class_id) or not 0 <= class_id < num_classes:
            raise DatasetError(f"{where}: class id {fields[0]} is outside 0..{num_classes - 1} "
                               "(the data YAML's names)")  # fmt: skip
        if not all(np.isfinite(values[1:])) or not all(0 <= v <= 1 for v in values[1:]):
            raise DatasetError(f"{where}: coordinates must be normalised to [0, 1], found "
                               f"{' '.join(fields[1:])}")  # fmt: skip
        if values[3] == 0 or values[4] == 0:
            raise DatasetError(f"{where}: a box of zero width or height")
        rows.append(values)
    return np.asarray(rows, np.float32).reshape(-1, 5)


@dataclass(frozen=True)
class DetectionSplit:
    """One split of a detection set in canonical order: image paths, their boxes, and the
    fingerprint of images and labels together."""

    data: DetectionData
    split: str
    paths: tuple[str, ...]  # absolute image paths
    boxes: tuple[np.ndarray, ...]  # per image, (n, 5): class cx cy w h, normalised
    without_labels: int  # images with no label file (background images)
    fingerprint: dict

    def __len__(self) -> int:
        return len(self.paths)


def load_detection_split(data: DetectionData | str | Path, split: str) -> DetectionSplit:
    """Index one split: every image hashed and its label file read and hashed."""
    if not isinstance(data, DetectionData):
        data = read_data_yaml(data)
    if split not in data.splits:
        raise DatasetError(f"{data.yaml_file} names no {split} folder (it names "
                           f"{', '.join(data.splits)})")  # fmt: skip
    folder = data.splits[split]
    paths = tuple(sorted(image_files(folder), key=lambda path: relative_path(path, folder)))
    if not paths:
        raise DatasetError(f"the {split} folder {folder} holds no images")
    digest = hashlib.sha256()
    digest.update(json.dumps([FINGERPRINT_TAG, len(paths), list(data.names)]).encode() + b"\n")
    boxes, without = [], 0
    for path in paths:
        labels = label_file(path)
        found = os.path.isfile(labels)
        without += not found
        image_sha = file_digest(Path(path))
        label_sha = file_digest(Path(labels)) if found else None
        none = np.zeros((0, 5), np.float32)
        boxes.append(read_labels(labels, len(data.names)) if found else none)
        digest.update(json.dumps([relative_path(path, folder), image_sha, label_sha]).encode()
                      + b"\n")  # fmt: skip
    if without == len(paths):
        raise DatasetError(f"no image of {folder} has a label file (expected "
                           f"{label_file(paths[0])} for {paths[0]})")  # fmt: skip
    fingerprint = {"count": len(paths), "num_classes": len(data.names),
                   "classes": list(data.names), "sha256": digest.hexdigest()}  # fmt: skip
    return DetectionSplit(data, split, paths, tuple(boxes), without, fingerprint)
