"""How an image folder's files are decoded: one size for every split by a documented rule,
aspect-ratio-keeping resize as timm's eval transform does it, and the settings a cache or a
run was made with recorded and reused by every later command."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails, invoke
from kdpipe.base.errors import CacheMismatchError
from kdpipe.data.datasets import decode_options, load_dataset
from PIL import Image


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def mixed_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    """train/ and test/ of classes a and b, one noise image per (H, W) given, per class."""
    for split, shapes in sizes.items():
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i, (h, w) in enumerate(shapes):
                noise_image(h, w, i).save(root / split / label / f"{i}.png")
    return root


def test_a_non_square_image_decodes_as_timm_s_eval_transform(tmp_path: Path) -> None:
    """crop (the default): shorter side to S then the centre, exactly timm's eval transform
    (Resize(S) + CenterCrop(S), bilinear, crop_pct 1) on the same PIL image; squash stretches."""
    from timm.data import create_transform

    root = mixed_folder(tmp_path / "imgs", {"train": [(30, 47), (41, 23)]})
    timm_eval = create_transform(16, is_training=False, crop_pct=1.0, interpolation="bilinear",
                                 mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    data = load_dataset(str(root), "train", image_size=16)
    for row, path in enumerate(data.images.paths[:2]):
        with Image.open(path) as image:
            expected = timm_eval(image.convert("RGB"))
        assert torch.equal(data.images[row].float() / 255, expected), path
    squashed = load_dataset(str(root), "train", image_size=16, resize="squash")
    with Image.open(squashed.images.paths[0]) as image:
        stretched = np.asarray(image.convert("RGB").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(squashed.images[0].numpy().transpose(1, 2, 0), stretched)
    assert squashed.fingerprint()["sha256"] != data.fingerprint()["sha256"]


def test_every_split_of_a_mixed_folder_decodes_at_one_size(tmp_path: Path) -> None:
    """Train at 117 x 113 first and test at 146 x 131 first decoded each at its own first
    file's size; now both at the train split's median shorter side, and a 1 x 1 file
    first in order does not set the size of the rest."""
    root = mixed_folder(tmp_path / "imgs", {"train": [(117, 113), (120, 90), (100, 140)],
                                             "test": [(146, 131), (60, 80)]})  # fmt: skip
    train, test = load_dataset(str(root), "train"), load_dataset(str(root), "test")
    assert train.images.shape[1:] == test.images.shape[1:] == (3, 100, 100)
    assert test.images[0].shape == (3, 100, 100)
    Image.new("RGB", (1, 1)).save(root / "train" / "a" / "!.png")  # first in canonical order
    assert load_dataset(str(root), "train").input_size == (3, 100, 100)
    same = mixed_folder(tmp_path / "same", {"train": [(20, 30)], "test": [(50, 50)]})
    assert load_dataset(str(same), "test").input_size == (3, 20, 30)  # train's one size


def test_decode_settings_come_from_the_cache_and_differences_are_named(tmp_path: Path) -> None:
    """A cache made with --image-size 8: train-student, verify --data and lineage need no
    --image-size (it looked like corruption: MISMATCH, "the files changed since"); one
    given and different is one line naming it and both values."""
    root = mixed_folder(tmp_path / "imgs", {"train": [(12, 12)] * 4, "test": [(12, 12)] * 2})
    teacher, store, pupil = tmp_path / "t", tmp_path / "c.zarr", tmp_path / "s"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --image-size 8 --data", root,
                  "--out", teacher)  # fmt: skip
    assert made.exit_code == 0, made.output
    cached = invoke("cache-teacher --temperature 2 --image-size 8 --data", root, "--teacher",
                    teacher, "--out", store)  # fmt: skip
    assert cached.exit_code == 0, cached.output
    trained = invoke("train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --data", root,
                     "--cache", store, "--out", pupil)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert invoke("verify", store, "--data", root).exit_code == 0
    traced = invoke("lineage", pupil)
    assert traced.exit_code == 0 and "MISMATCH" not in traced.output, traced.output
    scored = invoke("evaluate", pupil, "--data", root)
    assert scored.exit_code == 0, scored.output
    fails(invoke("train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --image-size 10 "
                 "--data", root, "--cache", store, "--out", tmp_path / "s2"),
          "--image-size 10x10 differs from the 8x8 that")  # fmt: skip
    fails(invoke("verify", store, "--data", root, "--resize squash"),
          "--resize squash differs from the crop that")  # fmt: skip
    assert not (tmp_path / "s2").exists()


def test_a_record_without_decode_is_read_as_before() -> None:
    """An older manifest or card has no dataset.decode: nothing is taken from it."""
    record = {"name": "x", "split": "train", "fingerprint": {}}
    assert decode_options(record, "old", image_size=5) == {
        "image_size": 5, "channels": None, "resize": None}  # fmt: skip
    recorded = {**record, "decode": {"size": [4, 6], "channels": 1, "resize": "crop"}}
    assert decode_options(recorded, "c")["image_size"] == (4, 6)
    with pytest.raises(CacheMismatchError, match="--channels 3 differs from the 1 that c"):
        decode_options(recorded, "c", channels=3)


def test_a_pretrained_model_reads_each_file_through_its_own_transform(tmp_path: Path) -> None:
    """model_rows: a folder's (and the same folder packed as shards') rows for a model with
    its own eval transform are each file through timm's create_transform, not the row decoded
    at the folder's size and resized again; subsets and workers keep it; a model of kdpipe's
    own (no eval fields) gets the decoded rows."""
    from kdpipe.data.datasets import pack_image_folder
    from kdpipe.views.inputs import DataConfig, model_rows
    from timm.data import create_transform

    root = mixed_folder(tmp_path / "imgs", {"train": [(30, 47), (41, 23), (36, 36)],
                                             "test": [(20, 20)]})  # fmt: skip
    config = DataConfig((3, 16, 16), (0.5,) * 3, (0.25,) * 3, interpolation="bicubic",
                        crop_pct=0.8)  # fmt: skip
    timm_eval = create_transform(16, is_training=False, crop_pct=0.8, interpolation="bicubic",
                                 mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    folder = load_dataset(str(root), "train")
    expected = torch.stack([timm_eval(Image.open(p).convert("RGB")) for p in folder.images.paths])
    pack_image_folder(root, tmp_path / "shards", shard_size=2)
    shards = load_dataset(str(tmp_path / "shards"), "train")
    for images in (folder.images, shards.images):
        rows, finish = model_rows(images, config)
        assert not finish.eval_resize and finish.input_size == config.input_size
        assert rows.shape == (len(images), 3, 16, 16) and images.shape[-2:] != (16, 16)
        assert torch.equal(rows[:].float() / 255, expected)
        assert torch.equal(rows.subset([2, 0]).with_workers(1)[:].float() / 255, expected[[2, 0]])
    plain = DataConfig((3, 16, 16), (0.5,) * 3, (0.25,) * 3)
    assert model_rows(folder.images, plain) == (folder.images, plain)
