"""The new user's path, end to end (issue 27, acceptance 1): your own folder, your own teacher.

A folder of RGB JPEGs of mixed sizes and aspect ratios in three classes, and a timm
teacher trained outside kdpipe, saved the two ways people save one: timm's own
``save_for_hf`` folder (``label_names`` in its config) and a ``.pth`` state dict at its
own 32 px input. Then import, cache, a student, evaluate, lineage, export, the Python
API and ``kd.load_run``, with no command given a decode option after the import. Each
result is compared with the same step done by hand: timm's own ``resolve_data_config``
and ``create_transform`` on the files for the teachers and for the student's inputs,
ONNX Runtime on those inputs for the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import kdpipe as kd
import numpy as np
import pytest
import timm
import torch
from conftest import invoke
from PIL import Image
from timm.data import create_transform, resolve_data_config

ARCH = "resnet10t"
CLASSES = ("ant", "bee", "cat")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, as here and in CI: the hub offline, its cache empty."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def photo_folder(root: Path) -> Path:
    """root/{train,test}/<class>/NN.jpg: JPEGs of 40 to 96 px a side, mostly not square,
    each class tinted its own colour (a signal a student can find)."""
    rng = np.random.default_rng(7)
    for split, count in (("train", 10), ("test", 5)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(40, 97, 2))
                pixels = rng.integers(0, 128, (height, width, 3)).astype(np.uint8)
                pixels[..., label] += 120
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.jpg", quality=90)
    return root


def files(folder: Path, split: str) -> tuple[list[Path], torch.Tensor]:
    """A split's files and labels in the order a user lists them: class, then name."""
    paths = sorted((folder / split).glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name))
    return paths, torch.tensor([CLASSES.index(p.parent.name) for p in paths])


def by_hand(model: torch.nn.Module, config: dict, paths: list[Path]) -> torch.Tensor:
    """The logits timm's own eval transform and the model give the files."""
    transform = create_transform(**config, is_training=False)
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return model.eval()(batch)


def accuracy(result: object) -> float:
    assert result.exit_code == 0, result.output
    return float(json.loads(result.output)[0]["accuracy"])


def test_your_own_folder_and_teacher_from_import_to_an_exported_student(tmp_path: Path) -> None:
    folder = photo_folder(tmp_path / "photos")
    train_paths, _ = files(folder, "train")
    test_paths, test_labels = files(folder, "test")
    sides = {Image.open(p).size for p in train_paths}
    assert len(sides) > 20 and any(w != h for w, h in sides)  # mixed sizes and shapes

    # the teacher, trained elsewhere: a confident 3-class resnet10t at 32 px
    torch.manual_seed(0)
    teacher = timm.create_model(ARCH, num_classes=len(CLASSES))
    with torch.no_grad():
        teacher.get_classifier().weight.mul_(200)
    hf_dir = tmp_path / "teacher-hf"
    timm.models.save_for_hf(teacher, str(hf_dir), safe_serialization=True,
                            model_config={"label_names": list(CLASSES)},
                            data_config={"input_size": (3, 32, 32), "interpolation": "bilinear",
                                         "crop_pct": 0.9})  # fmt: skip
    pth = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), pth)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")

    # 1. import both (the preprocessing is said once, here, for the bare state dict)
    t_hf, t_pth = tmp_path / "t-hf", tmp_path / "t-pth"
    made = invoke(f"import-teacher local-dir:{hf_dir} --out", t_hf)
    assert made.exit_code == 0 and "warning" not in made.output, made.output
    assert kd.load_run(t_hf).classes == list(CLASSES)  # from label_names
    made = invoke(f"import-teacher timm:{ARCH} --weights", pth, "--input-size 32 --classes",
                  names, "--out", t_pth)  # fmt: skip
    assert made.exit_code == 0 and "warning" not in made.output, made.output

    # by hand: timm loads the folder and resolves its data config, as a user would
    hub_model = timm.create_model(f"local-dir:{hf_dir}", pretrained=True)
    hf_config = resolve_data_config({}, model=hub_model)
    assert hf_config["input_size"] == (3, 32, 32) and hf_config["crop_pct"] == 0.9
    pth_model = timm.create_model(ARCH, num_classes=len(CLASSES))
    pth_model.load_state_dict(torch.load(pth, weights_only=True))
    pth_config = resolve_data_config({"img_size": 32}, pretrained_cfg=pth_model.pretrained_cfg)

    # 2. the cache: the teacher's log-probabilities are timm's transform and model's
    store = tmp_path / "teacher.zarr"
    cached = invoke("cache-teacher --data", folder, "--teacher", t_hf, "--out", store,
                    "--temperature 1 --dtype float32")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    cache = kd.open_cache(store)
    torch.testing.assert_close(cache.soft_targets(range(len(cache)), 0),
                               torch.log_softmax(by_hand(hub_model, hf_config, train_paths), -1),
                               rtol=1e-4, atol=1e-4)  # fmt: skip

    # 3. each teacher evaluated on the test split: the accuracy of the same steps by hand
    for run, model, config in ((t_hf, hub_model, hf_config), (t_pth, pth_model, pth_config)):
        expected = (by_hand(model, config, test_paths).argmax(-1) == test_labels).float().mean()
        assert accuracy(invoke("evaluate", run, "--data", folder, "--format json")) == \
            pytest.approx(float(expected), abs=1e-6)  # fmt: skip

    # 4. a student, then everything after it, never told how to decode the folder
    student = tmp_path / "student"
    trained = invoke("train-student --model kd_cnn_tiny --epochs 2 --alpha 0.5 --data", folder,
                     "--cache", store, "--out", student)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    run = kd.load_run(student)
    decode = cache.decode
    side = decode["image_size"]
    assert decode["resize"] == "crop" and run.data_config.input_size == (3, *side)
    test_set = kd.load_dataset(str(folder), "test", **decode)
    train_set = kd.load_dataset(str(folder), "train", **decode)
    assert test_set.input_size == train_set.input_size == (3, *side)  # one size for both
    # the student's inputs by hand: shorter side to S, the centre, its mean and std
    student_config = {"input_size": (3, *side), "interpolation": "bilinear", "crop_pct": 1.0,
                      "mean": run.data_config.mean, "std": run.data_config.std}  # fmt: skip
    logits = by_hand(run.model, student_config, test_paths)
    torch.testing.assert_close(run.predict(test_set.images[:]), logits, rtol=1e-4, atol=1e-4)
    expected = float((logits.argmax(-1) == test_labels).float().mean())
    assert accuracy(invoke("evaluate", student, "--data", folder, "--format json")) == \
        pytest.approx(expected, abs=1e-6)  # fmt: skip

    # 5. lineage follows the student to the folder the teacher's weights came from
    chain = invoke("lineage", student, "--format json")
    assert chain.exit_code == 0, chain.output
    links = {row["link"]: row["detail"] for row in json.loads(chain.output)}
    assert links["source"].startswith(f"weights from the local folder {hf_dir}"), links
    assert "MISMATCH" not in chain.output

    # 6. the export: ONNX Runtime on the by-hand inputs gives the student's logits
    onnx_file = tmp_path / "student.onnx"
    exported = invoke("export", student, "--out", onnx_file, "--check-rows 15")
    assert exported.exit_code == 0, exported.output
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: run.inputs(test_set.images[:]).numpy()}
    np.testing.assert_allclose(session.run(None, feed)[0], logits.numpy(), rtol=1e-3, atol=1e-3)
    assert accuracy(invoke("evaluate", onnx_file, "--data", folder, "--format json")) == \
        pytest.approx(expected, abs=1e-6)  # fmt: skip

    # 7. the Python API over the same folder: batches by train-student's path, each the
    # items of its rows, decoded as the cache's data was
    dataset = kd.DistillationDataset(train_set, cache)
    batches = list(dataset.batches(8, shuffle=False))
    assert sum(len(b[0]) for b in batches) == len(train_set) == len(train_paths)
    first = torch.stack([dataset[row][0] for row in range(8)])
    torch.testing.assert_close(batches[0][0], first, atol=1e-5, rtol=0)
