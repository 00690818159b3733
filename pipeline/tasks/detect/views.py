"""Detection views: explicit parameters per stored view, and the one renderer of pixels and
boxes from them, so that a teacher and every student see the same image.

A view is seven numbers (:data:`VIEW_FIELDS`): ``scale`` about the canvas centre,
``translate_x`` and ``translate_y`` as fractions of the canvas side, ``flip`` (left-right,
0 or 1), and the hue, saturation and value gains of Ultralytics' ``RandomHSV`` (a gain
``g`` maps hue ``h -> h + 180 * g_h`` modulo 180, saturation and value ``x -> x * g``).
View 0 of every row is the plain letterboxed image: ``(1, 0, 0, 0, 0, 1, 1)``.

Rendering (:func:`render`): Ultralytics' own ``LetterBox`` to the square canvas (aspect
ratio kept, padded with 114, centred), then the scale-and-translate as one
``cv2.warpAffine`` (bilinear, border 114, as its ``RandomPerspective``), the flip, then the
HSV look-up tables. Boxes go through the same geometry and are kept by Ultralytics' own
rule (``box_candidates``: at least 2 px a side, at least 10 % of their area left, aspect
ratio below 100). The parameters are drawn once from a seed per (row, view)
(:func:`draw_views`) and stored: a change of library, worker count or process count does
not change a stored view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kdpipe.tasks.detect.yolo import ultralytics

VIEW_FIELDS = ("scale", "translate_x", "translate_y", "flip", "hue", "saturation", "value")
PLAIN_VIEW = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], np.float32)
PAD_VALUE = 114


@dataclass(frozen=True, kw_only=True)
class DetectAugment:
    """The ranges views are drawn from: Ultralytics' training defaults (scale 0.5,
    translate 0.1, fliplr 0.5, hsv_h 0.015, hsv_s 0.7, hsv_v 0.4), mosaic aside."""

    scale: float = 0.5
    translate: float = 0.1
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4


def draw_views(rows: np.ndarray, views: int, seed: int, augment: DetectAugment) -> np.ndarray:
    """``(len(rows), views, 7)`` parameters: view 0 plain, view v >= 1 drawn from PCG64
    seeded with (seed, dataset row, v), the same whichever process draws it."""
    out = np.tile(PLAIN_VIEW, (len(rows), views, 1))
    for i, row in enumerate(rows):
        for view in range(1, views):
            rng = np.random.default_rng((seed, int(row), view))
            scale = rng.uniform(1 - augment.scale, 1 + augment.scale)
            tx, ty = rng.uniform(-augment.translate, augment.translate, 2)
            flip = float(rng.random() < augment.fliplr)
            gains = rng.uniform(-1, 1, 3) * [augment.hsv_h, augment.hsv_s, augment.hsv_v]
            out[i, view] = [scale, tx, ty, flip, gains[0], 1 + gains[1], 1 + gains[2]]
    return out


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``, decoded as Ultralytics' own loader decodes
    it (its ``imread``: OpenCV, then BGR to RGB), so a view renders the pixels a teacher
    trained by Ultralytics saw; an unreadable file is one error naming it."""
    ultralytics()
    from kdpipe.base.errors import DatasetError
    from ultralytics.utils.patches import imread

    image = imread(str(path))
    if image is None:
        raise DatasetError(f"cannot read the image {path} (OpenCV cannot decode it)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, 2::-1])


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    """Ultralytics' ``LetterBox`` (not automatic, centred, scaled up) of an RGB uint8
    ``(H, W, 3)`` image to ``size`` x ``size``: the canvas, the ratio, left and top pads."""
    ultralytics()
    from ultralytics.data.augment import LetterBox

    box = LetterBox(new_shape=(size, size), auto=False, scale_fill=False, scaleup=True,
                    center=True, padding_value=PAD_VALUE)  # fmt: skip
    params = box.get_params({"img": image})
    canvas = box.apply_image({"img": image}, params)["img"]
    return canvas, float(params["ratio"][0]), int(params["left"]), int(params["top"])


def _hsv(canvas: np.ndarray, hue: float, saturation: float, value: float) -> np.ndarray:
    """RandomHSV's look-up tables with the stored gains (its own code draws them itself)."""
    import cv2

    if hue == 0 and saturation == 1 and value == 1:
        return canvas
    x = np.arange(0, 256, dtype=np.float64)
    lut_hue = ((x + hue * 180) % 180).astype(np.uint8)
    lut_sat = np.clip(x * saturation, 0, 255).astype(np.uint8)
    lut_val = np.clip(x * value, 0, 255).astype(np.uint8)
    lut_sat[0] = 0  # as Ultralytics 8.3.79+: pure white keeps its colour
    lut = np.stack((lut_hue, lut_sat, lut_val), -1).reshape(1, 256, 3)
    return cv2.cvtColor(cv2.LUT(cv2.cvtColor(canvas, cv2.COLOR_RGB2HSV), lut), cv2.COLOR_HSV2RGB)


def _keep(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Ultralytics' ``box_candidates`` on (n, 4) xyxy pixel boxes before and after."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    return (w2 > 2) & (h2 > 2) & (w2 * h2 / (w1 * h1 + 1e-16) > 0.1) & (aspect < 100)


def render(
    image: np.ndarray, boxes: np.ndarray, view: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One stored view of an RGB uint8 ``(H, W, 3)`` image and its ``(n, 5)`` boxes
    (class cx cy w h, normalised to the image): the ``(size, size, 3)`` uint8 canvas and
    the boxes left in it, ``(m, 5)`` class cx cy w h normalised to the canvas."""
    import cv2

    scale, tx, ty, flip, hue, saturation, value = (float(v) for v in view)
    canvas, ratio, left, top = letterbox(image, size)
    height, width = image.shape[:2]
    xyxy = np.stack([(boxes[:, 1] - boxes[:, 3] / 2) * width, (boxes[:, 2] - boxes[:, 4] / 2)
                     * height, (boxes[:, 1] + boxes[:, 3] / 2) * width,
                     (boxes[:, 2] + boxes[:, 4] / 2) * height], 1) * ratio  # fmt: skip
    xyxy += [left, top, left, top]
    before = xyxy.copy()
    if (scale, tx, ty) != (1.0, 0.0, 0.0):
        centre = size / 2
        matrix = np.array([[scale, 0, centre - scale * centre + tx * size],
                           [0, scale, centre - scale * centre + ty * size]])  # fmt: skip
        canvas = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderValue=(PAD_VALUE,) * 3)  # fmt: skip
        xyxy = xyxy * scale + [matrix[0, 2], matrix[1, 2], matrix[0, 2], matrix[1, 2]]
    if flip:
        canvas = np.ascontiguousarray(canvas[:, ::-1])
        xyxy = np.stack([size - xyxy[:, 2], xyxy[:, 1], size - xyxy[:, 0], xyxy[:, 3]], 1)
        before = np.stack([size - before[:, 2], before[:, 1], size - before[:, 0],
                           before[:, 3]], 1)  # fmt: skip
    canvas = _hsv(canvas, hue, saturation, value)
    clipped = np.clip(xyxy, 0, size)
    keep = _keep(before * (scale if (scale, tx, ty) != (1.0, 0.0, 0.0) else 1.0), clipped)
    clipped, classes = clipped[keep], boxes[keep, :1]
    out = np.concatenate([classes, (clipped[:, :2] + clipped[:, 2:]) / 2 / size,
                          (clipped[:, 2:] - clipped[:, :2]) / size], 1)  # fmt: skip
    return canvas, out.astype(np.float32)
