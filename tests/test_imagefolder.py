"""Image folders that are never decoded whole: modes, unreadable files, the index and its
fingerprint, caches made from a folder, and memory that does not grow with the folder."""

import io
import json
import os
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke
from kdpipe.api import DistillationDataset
from kdpipe.base.distributed import World
from kdpipe.base.errors import CacheMismatchError, DatasetError
from kdpipe.cache import load_soft_labels
from kdpipe.data.datasets import load_dataset, make_synthetic, take_rows
from kdpipe.data.imagefolder import FolderImages, batches_of, decode_image, index_path
from kdpipe.models.teacher import predict_logits
from kdpipe.train.batches import EpochBatches, TrainData
from kdpipe.views.inputs import DataConfig
from PIL import Image

CPU = torch.device("cpu")
PINNED = "18d64b9afee48562fdee0d5b23f0e9537c0fe058002c5bd169ddae1a36e91500"


def error_lines(result: object) -> list[str]:
    """The lines of a failed command that are its error (progress lines aside)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def colour_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """train/ and test/ with class folders of small RGB PNGs: red-ish 'a', blue-ish 'b'."""
    for split, count in counts.items():
        for label, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                shade = tuple(max(0, c - 7 * index) for c in colour)
                Image.new("RGB", (size, size), shade).save(root / split / label / f"{index}.png")
    return root


def truncated_jpeg() -> bytes:
    """A JPEG whose header is whole and whose data stops early: it opens, and fails to decode."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# --- modes -------------------------------------------------------------------------------------


def test_each_mode_is_converted_the_documented_way(tmp_path: Path) -> None:
    def saved(image: Image.Image, name: str, **options: object) -> str:
        path = tmp_path / name
        image.save(path, **options)
        return str(path)

    size = (3, 4)  # H, W
    rgb = decode_image(saved(Image.new("RGB", (4, 3), (10, 20, 30)), "rgb.png"), 3, size)
    assert rgb.shape == (3, 3, 4) and rgb[:, 0, 0].tolist() == [10, 20, 30]
    gray = decode_image(saved(Image.new("L", (4, 3), 77), "l.png"), 3, size)
    assert gray[:, 0, 0].tolist() == [77, 77, 77]
    # alpha composited on white: transparent pixels white, opaque ones their colour
    rgba = Image.new("RGBA", (4, 3), (200, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    composited = decode_image(saved(rgba, "rgba.png"), 3, size)
    assert composited[:, 0, 0].tolist() == [255, 255, 255]
    assert composited[:, 0, 1].tolist() == [200, 0, 0]
    assert composited[:, 0, 2].tolist() == [127, 127, 127]
    la = Image.new("LA", (4, 3), (0, 0))
    la.putpixel((3, 2), (50, 255))
    la_pixels = decode_image(saved(la, "la.png"), 1, size)
    assert la_pixels.shape == (1, 3, 4) and la_pixels[0, 0, 0] == 255 and la_pixels[0, 2, 3] == 50
    # palette, with and without a transparent entry
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    assert decode_image(saved(palette, "p.png"), 3, size)[:, 0, 0].tolist() == [0, 128, 255]
    clear = decode_image(saved(palette, "pt.png", transparency=1), 3, size)
    assert clear[:, 0, 0].tolist() == [255, 255, 255]
    # CMYK JPEG: PIL's conversion to RGB, as PIL itself decodes it
    cmyk = saved(Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "cmyk.jpg", quality=100)
    with Image.open(cmyk) as opened:
        assert opened.mode == "CMYK"
        expected = np.asarray(opened.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(cmyk, 3, size), expected)
    assert decode_image(cmyk, 3, size)[0, 1, 1] > 200  # red stays red
    # 16-bit PNG: 0..65535 scaled onto 0..255 (PIL's convert("L") would clip it)
    deep = np.array([[0, 32768, 65535, 1000]] * 3, dtype=np.uint16)
    path16 = saved(Image.fromarray(deep), "i16.png")
    with Image.open(path16) as opened:
        assert opened.mode.startswith("I")
    assert decode_image(path16, 1, size)[0, 0].tolist() == [0, 128, 255, 4]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A photo stored landscape with orientation 6 (rotate 90 clockwise) decodes portrait."""
    stored = Image.new("RGB", (6, 4), (0, 0, 0))
    stored.putpixel((0, 0), (255, 255, 255))  # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=100)
    root = tmp_path / "photos"
    for split in ("train", "test"):
        for label in ("x", "y"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "rotated.jpg").write_bytes(path.read_bytes())
    data = load_dataset(str(root), "train")
    assert data.input_size == (3, 6, 4)  # height 6, width 4: as shown, not as stored
    pixels = data.images[0]
    # rotated clockwise, the stored top-left corner is now at the top right
    assert pixels[:, 0, 3].float().mean() > 200 and pixels[:, 0, 0].float().mean() < 60


def test_a_folder_of_mixed_modes_loads_at_one_shape(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(root / "train" / "a" / "0.png")
    Image.new("RGBA", (9, 7), (1, 2, 3, 255)).save(root / "train" / "a" / "1.png")
    Image.new("P", (3, 3)).save(root / "train" / "b" / "0.png")
    Image.new("CMYK", (4, 6)).save(root / "train" / "b" / "1.jpg")
    Image.fromarray(np.full((5, 5), 40000, np.uint16)).save(root / "train" / "b" / "2.png")
    data = load_dataset(str(root), "train")
    assert data.input_size == (3, 5, 5) and data.images[:].shape == (5, 3, 5, 5)
    assert data.images[4, :, 2, 2].tolist() == [156, 156, 156]


# --- unreadable files ----------------------------------------------------------------------------


def test_a_file_that_is_not_an_image_is_named_when_the_folder_opens(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs", {"train": 3})
    (root / "train" / "b" / "notes.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    with pytest.raises(DatasetError, match=r"^cannot read image .*notes\.jpg: "):
        load_dataset(str(root), "train")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_file_stops_the_teacher_pass_naming_it(tmp_path: Path, workers: int) -> None:
    """A JPEG whose data stops half way opens (its header is whole) and fails to decode: the
    pass stops with one line naming it, in the main process or in a DataLoader worker."""
    root = colour_folder(tmp_path / "imgs", {"train": 6, "test": 2}, size=16)
    teacher = tmp_path / "t"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", root, "--out", teacher)
    assert made.exit_code == 0, made.output
    (root / "train" / "b" / "cut.jpg").write_bytes(truncated_jpeg())
    assert len(load_dataset(str(root), "train")) == 13  # it opens: the pass finds it
    cached = invoke("cache-teacher --temperature 2 --batch-size 4 --data", root, "--teacher",
                    teacher, "--out", tmp_path / "c.zarr", f"--workers {workers}")  # fmt: skip
    lines = error_lines(cached)
    assert len(lines) == 1 and "cannot read image" in lines[0] and "cut.jpg" in lines[0], lines


# --- the index and the fingerprint -------------------------------------------------------------


def test_the_fingerprint_changes_with_each_kind_of_edit_and_only_then(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for index in range(3):  # BMP: uncompressed, so one byte edited is still an image
            Image.new("RGB", (4, 4), (index * 20, 0, 0)).save(
                root / "train" / label / f"{index}.bmp"
            )

    def fingerprint() -> str:
        return load_dataset(str(root), "train").fingerprint()["sha256"]

    first = fingerprint()
    stored = index_path(root, "train")
    written = stored.stat().st_mtime_ns
    assert fingerprint() == first  # nothing changed: the same, and the index not rewritten
    assert stored.stat().st_mtime_ns == written
    stored.unlink()
    assert fingerprint() == first  # rebuilt from the files: the same digest
    stored.write_text("{ damaged")
    assert fingerprint() == first
    record = json.loads(stored.read_text())
    assert [entry["path"] for entry in record["files"]][:2] == ["a/0.bmp", "a/1.bmp"]
    seen = {first}

    def changed() -> None:
        now = fingerprint()
        assert now not in seen
        seen.add(now)

    os.rename(root / "train" / "a" / "2.bmp", root / "train" / "a" / "9.bmp")
    changed()  # renamed: same bytes, another path
    Image.new("RGB", (4, 4), (5, 5, 5)).save(root / "train" / "b" / "3.bmp")
    changed()  # added
    (root / "train" / "b" / "0.bmp").unlink()
    changed()  # removed
    edited = root / "train" / "b" / "1.bmp"
    data = bytearray(edited.read_bytes())
    data[-1] ^= 1  # one byte of one pixel
    edited.write_bytes(bytes(data))
    changed()  # edited
    assert load_dataset(str(root), "train").fingerprint()["sha256"] in seen
    assert load_dataset(str(root), "train", image_size=8).fingerprint()["sha256"] not in seen


def test_the_folder_fingerprint_is_pinned(tmp_path: Path) -> None:
    """The digest's recipe (docs/cache-format.md) pinned on a folder of BMPs (bytes that
    do not depend on a zlib version): a change to it changes every folder cache's identity.
    Fashion-MNIST's and the synthetic set's stay digests of pixels (pinned in test_data)."""
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        Image.new("L", (2, 2), 9).save(tmp_path / "train" / label / "0.bmp")
    data = load_dataset(str(tmp_path), "train")
    assert data.streamed and make_synthetic("test").index is None
    assert data.fingerprint() == {
        "count": 2,
        "num_classes": 2,
        "classes": ["a", "b"],
        "sha256": PINNED,
    }


# --- a cache from a folder, and a folder that changed since ------------------------------------


def test_a_cache_from_a_folder_verifies_and_teaches_and_refuses_changed_files(
    tmp_path: Path,
) -> None:
    root = colour_folder(tmp_path / "imgs", {"train": 10, "test": 4}, size=12)
    teacher, store, pupil = tmp_path / "t", tmp_path / "c.zarr", tmp_path / "s"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", root, "--out", teacher)
    assert made.exit_code == 0, made.output
    views = "--views 2 --augment crop-flip --mix mixup --workers 2 --batch-size 4"
    cached = invoke("cache-teacher --temperature 2 --data", root, "--teacher", teacher, "--out",
                    store, views)  # fmt: skip
    assert cached.exit_code == 0, cached.output
    verified = invoke("verify", store, "--data", root, "--teacher", teacher, "--recompute 6")
    assert verified.exit_code == 0, verified.output
    distilled = invoke("train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --data", root,
                       "--cache", store, "--out", pupil, "--workers 1 --batch-size 8")  # fmt: skip
    assert distilled.exit_code == 0, distilled.output
    # the Python API takes the folder as it is: its index's fingerprint, one image per item
    items = DistillationDataset(load_dataset(str(root), "train"), store)
    image, label, target = items[3][:3]
    assert len(items) == 20 and image.shape == (3, 12, 12) and target.shape == (2,)
    assert int(label) == int(load_dataset(str(root), "train").labels[3])
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    Image.new("RGB", (12, 12), (1, 1, 1)).save(root / "train" / "a" / "0.png")  # edited
    for command in (
        ["verify", store, "--data", root],
        ["train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --data", root, "--cache", store,
         "--out", tmp_path / "s2"],
    ):  # fmt: skip
        lines = error_lines(invoke(*command))
        assert len(lines) == 1, lines
        assert f"the files of {root / 'train'} changed since" in lines[0], lines
    with pytest.raises(CacheMismatchError, match="changed since"):
        DistillationDataset(load_dataset(str(root), "train"), store)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "s2").exists()


# --- memory ------------------------------------------------------------------------------------


def peak_bytes(root: Path) -> tuple[int, int]:
    """tracemalloc's peak (numpy's pixel buffers are traced) while a folder is opened,
    fingerprinted and passed through a model batch by batch; and the bytes of its pixels."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 2))
    config = DataConfig((3, 48, 48), (0.5,) * 3, (0.25,) * 3)
    tracemalloc.start()
    try:
        data = load_dataset(str(root), "train")
        data.fingerprint()
        logits = predict_logits(model, data.images, config, device=torch.device("cpu"),
                                batch_size=16)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert logits.shape == (len(data), 2)
    return peak, len(data) * 3 * 48 * 48


def test_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    # imports and first-call allocations out of the way on a third folder
    peak_bytes(colour_folder(tmp_path / "warm", {"train": 2}, size=48))
    # each measured on its first open (its index built: every file hashed and opened)
    small = peak_bytes(colour_folder(tmp_path / "small", {"train": 20}, size=48))  # 40 images
    large_folder = colour_folder(tmp_path / "large", {"train": 200}, size=48)  # 400
    large = peak_bytes(large_folder)
    extra_pixels = large[1] - small[1]  # 360 images of 6.9 KB: 2.5 MB
    # the peak grows by the index's few hundred bytes per file, far less than the pixels
    assert large[0] - small[0] < 0.5 * extra_pixels, (small, large)
    # and the measure sees a folder decoded whole: every row at once is over the bound
    images = load_dataset(str(large_folder), "train").images
    tracemalloc.start()
    try:
        images[:]
        _, whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole > 0.9 * large[1]


def test_batches_of_decodes_ahead_in_workers_in_order(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs", {"train": 5}, size=6)
    images = load_dataset(str(root), "train").images
    requests = [torch.tensor([3, 1]), torch.tensor([0]), torch.tensor([9, 2, 2])]
    here = list(batches_of(images, requests))
    ahead = list(batches_of(images.with_workers(2), requests))
    assert [b.shape[0] for b in ahead] == [2, 1, 3]
    for a, b in zip(here, ahead, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(here[0][1], images[1], rtol=0, atol=0)


def test_an_unreadable_file_in_a_training_worker_is_one_line(tmp_path: Path) -> None:
    """Training batches built ahead in DataLoader workers decode there: a file that fails
    comes back as the dataset error naming it, not as a worker's traceback."""
    root = colour_folder(tmp_path / "imgs", {"train": 4}, size=6)
    (root / "train" / "b" / "cut.jpg").write_bytes(truncated_jpeg())
    data = load_dataset(str(root), "train")
    batches = EpochBatches(TrainData.plain(data), torch.arange(len(data)), 3, 1, 0, World())
    with pytest.raises(DatasetError, match=r"^cannot read image .*cut\.jpg: [^\n]*$"):
        list(batches.load(workers=1, pin_memory=False))


def test_a_validation_split_of_a_folder_stays_lazy(tmp_path: Path) -> None:
    """--val-fraction holds out rows of a folder as another lazy source (take_rows), scored
    batch by batch; the run's card records the whole split's fingerprint."""
    root = colour_folder(tmp_path / "imgs", {"train": 8, "test": 2}, size=6)
    run = tmp_path / "t"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 2 --val-fraction 0.25 --data",
                  root, "--out", run, "--workers 1")  # fmt: skip
    assert made.exit_code == 0, made.output
    card = json.loads((run / "model.json").read_text())
    assert card["dataset"]["fingerprint"] == load_dataset(str(root), "train").fingerprint()
    held_out = take_rows(load_dataset(str(root), "train").images, torch.tensor([1, 5]))
    assert isinstance(held_out, FolderImages) and held_out.shape == (2, 3, 6, 6)


# --- a teacher and a student at different input sizes, one stored view ------------------------


def noise_folder(root: Path, classes: tuple[str, ...], count: int, size: int) -> Path:
    """train/ and test/ with class folders of random RGB PNGs, ``size`` x ``size``."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


HUB_MEAN, HUB_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def hub_teacher(folder: Path, num_classes: int) -> Path:
    """A pretrained teacher in timm's hub format, taking 64 x 64 input: resnet10t with a
    head sure of itself (logits spread over tens, so that another view shows)."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet10t", num_classes=num_classes).state_dict()
    state["fc.weight"] *= 2000
    folder.mkdir(parents=True)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    config = {
        "architecture": "resnet10t",
        "num_classes": num_classes,
        "pretrained_cfg": {
            "input_size": [3, 64, 64], "interpolation": "bilinear", "crop_pct": 0.9,
            "crop_mode": "center", "mean": list(HUB_MEAN), "std": list(HUB_STD),
            "num_classes": num_classes, "first_conv": "conv1.0", "classifier": "fc",
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def source_pixels(root: Path, size: int) -> torch.Tensor:
    """Every train image as the docs say a folder's source is: PIL's bilinear resize of the
    file to --image-size, in canonical order (class, then path). Independent of kdpipe."""
    paths = sorted((root / "train").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    return torch.stack([
        torch.from_numpy(np.asarray(
            Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        ).transpose(2, 0, 1).copy())
        for p in paths
    ])  # fmt: skip


def test_a_teacher_and_a_student_at_different_sizes_replay_one_view(tmp_path: Path) -> None:
    """FKD's rule: a view is a crop box (fractions of the source) and a flip, rendered by
    each model at its own input size. Files 40 px, decoded at --image-size 32 (the source),
    a teacher at 64 px, a student at 32 px: the student's input for row r in epoch e is
    render(view v of row r) at 32 px, and the cached value for (r, v) is the teacher on
    render(view v of row r) at 64 px, recomputed with timm alone."""
    import timm
    from kdpipe.base.distributed import World
    from kdpipe.train import TrainConfig, TrainData, plan_run
    from kdpipe.views.inputs import render
    from kdpipe.views.policy import view_schedule

    root = noise_folder(tmp_path / "imgs", ("a", "b"), count=4, size=40)
    hub = hub_teacher(tmp_path / "hub", 2)
    teacher, store = tmp_path / "t", tmp_path / "c.zarr"
    made = invoke(f"import-teacher local-dir:{hub} --out", teacher)
    assert made.exit_code == 0, made.output
    cached = invoke("cache-teacher --data", root, "--image-size 32 --teacher", teacher, "--out",
                    store, "--temperature 2 --views 3 --augment crop-flip --seed 3 "
                    "--chunk-size 3")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    soft = load_soft_labels(store)
    assert soft.manifest.teachers[0].data_config["input_size"] == [3, 64, 64]
    assert not torch.equal(soft.views[..., :4], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(8, 3, 4))
    assert soft.views[..., 4].any() and not soft.views[..., 4].all()  # some views flipped
    source = source_pixels(root, 32)
    assert torch.equal(source, load_dataset(str(root), "train", image_size=32).images[:])
    # the teacher's values: timm's model from the hub files, on the view rendered at 64 px
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    mean, std = torch.tensor(HUB_MEAN).view(1, 3, 1, 1), torch.tensor(HUB_STD).view(1, 3, 1, 1)
    images = source[soft.indices]
    for view in range(3):
        at_64 = render(images, soft.views[:, view], None, (64, 64))
        with torch.no_grad():
            expected = torch.log_softmax(model((at_64 - mean) / std) / 2, dim=-1)
        got = soft.values[:, view].float()
        torch.testing.assert_close(got, expected, rtol=2**-10, atol=2e-3)
    assert float(expected.min()) < -3  # far from uniform: another view would show
    # the view rendered at the student's size and enlarged is not what the teacher saw
    enlarged = torch.nn.functional.interpolate(
        render(images, soft.views[:, 2], None, (32, 32)), size=(64, 64), mode="bilinear"
    )
    with torch.no_grad():
        other = torch.log_softmax(model((enlarged - mean) / std) / 2, dim=-1)
    assert not torch.allclose(other, got, rtol=2**-10, atol=2e-3)
    assert not torch.allclose(soft.values[:, 0].float(), soft.values[:, 1].float(), atol=0.1)
    # the student's input, as train-student builds it (the same plan, batches and step input)
    config = TrainConfig(model="kd_cnn", data=str(root), image_size=32, out="-", epochs=1,
                         cache=str(store), alpha=0.5)  # fmt: skip
    plan = plan_run(config, "student", soft, print, World())
    assert plan.data_config.input_size == (3, 32, 32)
    rows = torch.tensor([0, 3, 5, 7])
    for epoch in (1, 2):
        chosen = view_schedule(len(plan.data), 3, config.seed, epoch)[rows]
        gathered = plan.data.gather(rows, epoch, 0, config.seed)
        batch = TrainData.to_model(gathered, plan.data_config, CPU)
        params = soft.views[rows, chosen]
        student_mean = torch.tensor(plan.data_config.mean).view(1, 3, 1, 1)
        student_std = torch.tensor(plan.data_config.std).view(1, 3, 1, 1)
        at_32 = render(source[soft.indices[rows]], params, None, (32, 32))
        torch.testing.assert_close(batch["inputs"], (at_32 - student_mean) / student_std,
                                   rtol=0, atol=1e-5)  # fmt: skip
        # and its target is the cached teacher value for exactly that view
        torch.testing.assert_close(batch["targets"], soft.values[rows, chosen].float())
    trained = invoke("train-student --model kd_cnn --epochs 1 --alpha 0.5 --image-size 32 --data",
                     root, "--cache", store, "--out", tmp_path / "s")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    # a student at its own size, smaller than the source: --input-size renders every view at it
    small = replace(config, input_size=16)
    plan = plan_run(small, "student", soft, print, World())
    assert plan.data_config.input_size == (3, 16, 16)
    gathered = plan.data.gather(rows, 1, 0, config.seed)
    batch = TrainData.to_model(gathered, plan.data_config, CPU)
    params = soft.views[rows, view_schedule(len(plan.data), 3, config.seed, 1)[rows]]
    at_16 = render(source[soft.indices[rows]], params, None, (16, 16))
    torch.testing.assert_close(batch["inputs"], (at_16 - student_mean) / student_std,
                               rtol=0, atol=1e-5)  # fmt: skip
    trained = invoke("train-student --model kd_cnn --epochs 1 --alpha 0.5 --image-size 32 --data",
                     root, "--cache", store, "--input-size 16 --out", tmp_path / "s16")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    card = json.loads((tmp_path / "s16" / "model.json").read_text())
    assert card["data_config"]["input_size"] == [3, 16, 16]
    assert card["model_kwargs"]["img_size"] == [16, 16]


# --- the transfer-set options on a folder --------------------------------------------------------


def test_subset_excluded_classes_and_views_on_a_folder(tmp_path: Path) -> None:
    """--subset, --exclude-classes and --views with augmentation on an image folder: the rows
    are select_rows' (no excluded class), labels the folder's, each view's values the
    teacher's on that view; verify recomputes every row and a student trains on them."""
    from kdpipe.data.datasets import select_rows
    from kdpipe.models.runs import load_model

    root = noise_folder(tmp_path / "imgs", ("a", "b", "c"), count=6, size=12)
    teacher, store = tmp_path / "t", tmp_path / "c.zarr"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", root, "--out", teacher)
    assert made.exit_code == 0, made.output
    cached = invoke("cache-teacher --temperature 2 --data", root, "--teacher", teacher, "--out",
                    store, "--subset 0.5 --exclude-classes 1 --views 2 --augment crop-flip "
                    "--seed 7 --chunk-size 4")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    soft = load_soft_labels(store)
    data = load_dataset(str(root), "train")
    expected_rows = select_rows(data.labels, subset=0.5, exclude_classes=(1,), num_classes=3,
                                seed=7)  # fmt: skip
    assert np.array_equal(soft.indices.numpy(), expected_rows) and len(expected_rows) == 6
    assert not (data.labels[soft.indices] == 1).any()
    assert torch.equal(soft.labels, data.labels[soft.indices])
    assert soft.manifest.transfer == {"dataset_samples": 18, "subset": 0.5,
                                      "exclude_classes": [1], "labeled": True}  # fmt: skip
    model, card = load_model(teacher)
    for view in range(2):
        logits = predict_logits(model, data.images, card.data, device=CPU,
                                rows=soft.indices.numpy(),
                                params=soft.views[:, view].numpy(),
                                partners=soft.partners[:, view].numpy())  # fmt: skip
        expected = torch.log_softmax(logits / 2, -1)
        torch.testing.assert_close(soft.values[:, view].float(), expected, rtol=2**-10, atol=2e-3)
    verified = invoke("verify", store, "--data", root, "--teacher", teacher, "--recompute 6")
    assert verified.exit_code == 0, verified.output
    pupil = tmp_path / "s"
    trained = invoke("train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --data", root,
                     "--cache", store, "--out", pupil)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert json.loads((pupil / "model.json").read_text())["dataset"]["rows"] == 6


# --- the fingerprint's framing, and a folder that cannot be written ----------------------------


def bmp(shade: int, size: int = 3) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), shade).save(buffer, "BMP")
    return buffer.getvalue()


def test_names_with_tabs_and_newlines_cannot_forge_another_folder(tmp_path: Path) -> None:
    """Two unlabeled folders of two files each whose ``PATH\\tLABEL\\tSHA\\n`` lines joined
    to the same bytes (a name holding a tab, a digest and a newline ends one row and starts
    the next): they shared a fingerprint; JSON lines keep them apart."""
    import hashlib

    first, second = bmp(10), bmp(200)
    forged = f"\t-1\t{hashlib.sha256(first).hexdigest()}\n"
    folders = {
        "one": {"a.bmp": first, f"b.bmp{forged}c.bmp": second},
        "two": {f"a.bmp{forged}b.bmp": first, "c.bmp": second},
    }
    old_lines = {}
    for name, files in folders.items():
        for file_name, data in files.items():
            (tmp_path / name / "train").mkdir(parents=True, exist_ok=True)
            (tmp_path / name / "train" / file_name).write_bytes(data)
        index = load_dataset(str(tmp_path / name), "train").index
        old_lines[name] = "".join(f"{e.path}\t{e.label}\t{e.sha256}\n" for e in index.entries)
    assert old_lines["one"] == old_lines["two"]  # what the old digest covered: the same bytes
    one, two = (load_dataset(str(tmp_path / name), "train") for name in folders)
    assert one.fingerprint()["sha256"] != two.fingerprint()["sha256"]


def test_a_read_only_folder_keeps_its_index_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder on a read-only mount: every write under it fails with EROFS, the clean-up
    of the index's temporary file included (root writes anywhere, so the mount is played
    at the OS boundary: os.open for writing, os.unlink, os.replace)."""
    import errno

    root = colour_folder(tmp_path / "imgs", {"train": 3})
    expected = load_dataset(str(root), "train").fingerprint()
    index_path(root, "train").unlink()
    inside = str(root)

    def read_only(call: object) -> object:
        def guarded(path: object, *args: object, **kwargs: object) -> object:
            flags = args[0] if args and isinstance(args[0], int) else os.O_WRONLY
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if os.fspath(path).startswith(inside) and (call is not os.open or writes):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
            return call(path, *args, **kwargs)

        return guarded

    for name in ("open", "unlink", "replace"):
        monkeypatch.setattr(os, name, read_only(getattr(os, name)))
    for _ in range(2):  # rebuilt in memory on each open
        data = load_dataset(str(root), "train")
        assert data.fingerprint() == expected and len(data) == 6
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["train"]  # nothing written
