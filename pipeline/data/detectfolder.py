"""``kdpipe detect-folder``: a detection set in Ultralytics' YOLO format, made from Fashion-MNIST.

Anyone can rebuild it offline, bit for bit: canvas *i* of a split is drawn by a generator
seeded with ``(seed, split, i)`` (:data:`RECIPE` says every step), and ``RECIPE.json``
records the recipe, the counts, Pillow's versions and a SHA-256 over every file. Train
and val canvases take their garments from Fashion-MNIST's training images, test canvases
from its test images, so no garment is seen by both a student and its test.

The layout is Ultralytics' own: ``images/<split>/<i>.jpg``, ``labels/<split>/<i>.txt``
(one ``class cx cy w h`` line per garment, normalised to [0, 1]), and ``data.yaml``
naming the three image folders (relative to the YAML's folder) and the ten class names.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from kdpipe.base.errors import UsageError

RECIPE = {
    "source": "Fashion-MNIST: train and val canvases from its training images, test canvases "
    "from its test images; garment j of a canvas is image rng.integers(N) of that split",
    "canvas": "width and height each uniform in [min_side, max_side]; a background colour "
    "(uniform RGB) plus a texture: two plane waves of random direction, period 8-48 px and "
    "amplitude 0-40 per channel, plus uniform noise of +-12, clipped to [0, 255]",
    "garments": "1-4 per canvas (uniform); side uniform in [min_garment, max_garment] px "
    "(the 28 x 28 image resized with PIL bicubic); position uniform where it fits; up to "
    "20 tries for one whose box overlaps every earlier box by IoU < 0.3, else it is left "
    "out; composited as background + (colour - background) * gray / 255 with a uniform "
    "RGB colour",
    "box": "the tight box of the resized garment's pixels with gray > 16, in canvas pixels; "
    "written as class cx cy w h, normalised, 6 decimals",
    "jpeg": "PIL, quality fixed, 4:2:0 subsampling, baseline, not optimised",
    "order": "the generator's draws in this order: canvas size, background, texture, count, "
    "then per garment: image, side, colour, position (each try)",
}
SPLIT_NUMBER = {"train": 0, "val": 1, "test": 2}
SOURCE_SPLIT = {"train": "train", "val": "train", "test": "test"}
RECIPE_FILE = "RECIPE.json"
YAML_FILE = "data.yaml"
BOX_THRESHOLD = 16  # gray level above which a resized garment's pixel is part of its box


@dataclass(frozen=True, kw_only=True)
class DetectRecipe:
    seed: int = 0
    quality: int = 90
    min_side: int = 128
    max_side: int = 192
    min_garment: int = 24
    max_garment: int = 72
    max_garments: int = 4

    def validate(self) -> None:
        if not 1 <= self.quality <= 95:
            raise UsageError(f"--quality must be in 1..95, not {self.quality}")
        if not 32 <= self.min_side <= self.max_side:
            raise UsageError(f"the canvas side range {self.min_side}..{self.max_side} is "
                             "empty or below 32 px")  # fmt: skip
        if not 8 <= self.min_garment <= self.max_garment <= self.min_side:
            raise UsageError(
                f"the garment side range {self.min_garment}..{self.max_garment} must lie "
                f"within 8..{self.min_side} (the smallest canvas)"
            )
        if self.max_garments < 1:
            raise UsageError(f"--max-garments must be >= 1, not {self.max_garments}")


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) pixel boxes (x1, y1 exclusive)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.integers(0, 256, 3).astype(np.float64)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    texture = np.zeros((height, width, 3))
    for _ in range(2):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(8, 48)
        amplitude = rng.uniform(0, 40, 3)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
        texture += wave[..., None] * amplitude
    noise = rng.uniform(-12, 12, (height, width, 3))
    return np.clip(base + texture + noise, 0, 255)


def render_canvas(
    grays: np.ndarray, labels: np.ndarray, split: str, index: int, recipe: DetectRecipe
) -> tuple[bytes, list[tuple[int, float, float, float, float]]]:
    """Canvas ``index`` of ``split`` by :data:`RECIPE`: its JPEG bytes and its boxes as
    ``(class, cx, cy, w, h)`` normalised to the canvas. ``grays`` (N, 28, 28) and
    ``labels`` (N,) are the source split of Fashion-MNIST."""
    from PIL import Image

    rng = np.random.default_rng((recipe.seed, SPLIT_NUMBER[split], index))
    width = int(rng.integers(recipe.min_side, recipe.max_side + 1))
    height = int(rng.integers(recipe.min_side, recipe.max_side + 1))
    canvas = _background(rng, height, width)
    count = int(rng.integers(1, recipe.max_garments + 1))
    placed: list[tuple[int, int, int, int]] = []
    boxes = []
    for _ in range(count):
        source = int(rng.integers(len(grays)))
        side = int(rng.integers(recipe.min_garment, recipe.max_garment + 1))
        colour = rng.integers(0, 256, 3).astype(np.float64)
        gray = np.asarray(Image.fromarray(grays[source]).resize((side, side), Image.BICUBIC))
        ys, xs = np.nonzero(gray > BOX_THRESHOLD)
        if len(xs) == 0:  # a garment with no pixel above the threshold has no box
            continue
        for _try in range(20):
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            box = (left + int(xs.min()), top + int(ys.min()),
                   left + int(xs.max()) + 1, top + int(ys.max()) + 1)  # fmt: skip
            if all(_iou(box, other) < 0.3 for other in placed):
                break
        else:
            continue
        weight = gray.astype(np.float64)[..., None] / 255.0
        region = canvas[top : top + side, left : left + side]
        canvas[top : top + side, left : left + side] = region + (colour - region) * weight
        placed.append(box)
        x0, y0, x1, y1 = box
        boxes.append((int(labels[source]), (x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                      (x1 - x0) / width, (y1 - y0) / height))  # fmt: skip
    image = Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=recipe.quality, subsampling=2, optimize=False,
               progressive=False)  # fmt: skip
    return out.getvalue(), boxes


def label_lines(boxes: list[tuple[int, float, float, float, float]]) -> str:
    return "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in boxes)


def data_yaml(names: tuple[str, ...]) -> str:
    """The data YAML Ultralytics reads: split folders relative to the YAML's own folder
    (no ``path:`` key, so the folder can move), no ``download:``."""
    lines = ["# kdpipe detect-folder: Fashion-MNIST garments on textured canvases",
             "train: images/train", "val: images/val", "test: images/test", "names:"]  # fmt: skip
    lines += [f"  {i}: {json.dumps(name)}" for i, name in enumerate(names)]
    return "\n".join(lines) + "\n"


def build_detect_folder(
    out: Path,
    counts: dict[str, int],
    *,
    source: str = "fashion-mnist",
    data_root: Path = Path("data"),
    recipe: DetectRecipe = DetectRecipe(),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the detection set of :data:`RECIPE` into ``out`` (``counts`` canvases per split
    of train, val and test): images, labels, ``data.yaml`` and ``RECIPE.json`` (returned).
    ``source`` is another grayscale dataset in its place (``synthetic`` in the tests)."""
    from kdpipe.base.outputs import DETECT_SET, guard_output, mark_folder
    from kdpipe.data.datasets import load_dataset
    from PIL import __version__ as pillow_version
    from PIL import features

    recipe.validate()
    unknown = set(counts) - set(SPLIT_NUMBER)
    if unknown or any(count < 1 for count in counts.values()):
        raise UsageError(f"counts must be >= 1 for splits of {sorted(SPLIT_NUMBER)}: {counts}")
    out = Path(out)
    guard_output(out, DETECT_SET, overwrite=overwrite, inputs=[Path(data_root) / source],
                 option="--dest")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    mark_folder(out, "detect-folder")  # first: a build killed half-way is still known as ours
    sources = {}
    written: list[tuple[str, str]] = []
    for split, count in counts.items():
        source_split = SOURCE_SPLIT[split]
        if source_split not in sources:
            dataset = load_dataset(source, source_split, data_root=Path(data_root))
            sources[source_split] = (dataset.images[:, 0].numpy(), dataset.labels.numpy(),
                                     dataset.classes)  # fmt: skip
        grays, labels, names = sources[source_split]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            data, boxes = render_canvas(grays, labels, split, index, recipe)
            for relative, content in ((f"images/{split}/{index:06d}.jpg", data),
                                      (f"labels/{split}/{index:06d}.txt",
                                       label_lines(boxes).encode())):  # fmt: skip
                (out / relative).write_bytes(content)
                written.append((relative, hashlib.sha256(content).hexdigest()))
        log(f"{out / 'images' / split}: {count} canvases")
    (out / YAML_FILE).write_text(data_yaml(names))
    digest = hashlib.sha256()
    for relative, sha in sorted([*written, (YAML_FILE, hashlib.sha256(
            (out / YAML_FILE).read_bytes()).hexdigest())]):  # fmt: skip
        digest.update(json.dumps([relative, sha]).encode() + b"\n")
    record = {"recipe": RECIPE, **asdict(recipe), "source": source, "counts": dict(counts),
              "pillow": pillow_version, "libjpeg": features.version("jpg"),
              "files_sha256": digest.hexdigest()}  # fmt: skip
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record
