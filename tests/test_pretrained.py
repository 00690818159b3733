"""Teachers from anywhere: pretrained timm models and weights files (issue 18, part 1).

There is no network here (nor in CI): a timm model's weights saved to a file stand in
for a download, and the hub is put offline so that its path ends in its clear error.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import fails, invoke, snapshot
from kdpipe.cache import load_soft_labels, read_manifest
from kdpipe.data.datasets import load_dataset
from kdpipe.export.onnx import read_onnx_card
from kdpipe.models.registry import weights_sha256
from kdpipe.models.runs import load_model, read_card
from kdpipe.views.inputs import DataConfig, prepare_input
from PIL import Image

ARCH = "resnet10t"
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub offline and its cache empty: what a machine without a network sees, at
    once rather than after huggingface_hub's retries."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The stand-in for downloaded weights: timm's resnet10t with a 3-class head."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=NUM_CLASSES).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # a head sure of itself (logits spread over tens), so that another resize, crop or
    # normalisation shows in the log-probabilities, not only in the third decimal
    state["fc.weight"] *= 200
    return state


@pytest.fixture(scope="module")
def weights(state: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path


def rgb_folder(root: Path, count: int = 3, size: tuple[int, int] = (40, 52)) -> Path:
    """root/{train,test}/<class>/<i>.png: random RGB images, 40 high and 52 wide (not
    square: the resize is by the shorter side)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("ant", "bee", "cat"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def expected_hash(state: dict) -> str:
    model = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    model.load_state_dict(state)
    return weights_sha256(model)


# --- each source ---------------------------------------------------------------------------


def test_a_timm_arch_with_a_weights_file_is_a_teacher_run(
    weights: Path, state: dict, tmp_path: Path
) -> None:
    out = tmp_path / "teacher"
    result = invoke("import-teacher timm:resnet10t --weights", weights, "--out", out)
    assert result.exit_code == 0, result.output
    card = read_card(out)
    assert card.kind == "teacher" and card.architecture == ARCH
    assert card.num_classes == NUM_CLASSES and card.classes == []
    assert card.weights_sha256 == expected_hash(state)
    # the model's own preprocessing, from timm's pretrained_cfg for resnet10t.c3_in1k
    cfg = timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg(ARCH).to_dict()
    )
    assert card.data_config == {
        "input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]),
        "std": list(cfg["std"]), "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"], "crop_mode": cfg["crop_mode"],
    }  # fmt: skip
    assert card.source["source"] == "timm:resnet10t"
    assert card.source["pretrained_cfg"] == "resnet10t.c3_in1k"
    assert card.source["weights_file"] == str(weights)
    model, loaded = load_model(out)  # rebuilt from the card alone, hash checked
    assert loaded == card and weights_sha256(model.to(memory_format=torch.contiguous_format))


def test_kdpipe_s_own_network_imports_at_its_input_size(teacher_run: Path, tmp_path: Path) -> None:
    """timm:kd_cnn with a kdpipe run's weights at the run's input size: kdpipe's networks
    size their dense layer by the input, so the model is built at --input-size (it was
    built at the pretrained_cfg's 28 px, and every such file "did not fit"). Found by
    make faults' guard sweep."""
    card = read_card(teacher_run)
    side = card.data_config["input_size"][1]
    mean, std = (",".join(map(str, card.data_config[key])) for key in ("mean", "std"))
    out = tmp_path / "imported"
    result = invoke(f"import-teacher timm:{card.architecture} --weights",
                    teacher_run / "model.safetensors", f"--input-size {side} --mean {mean} "
                    f"--std {std} --out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    imported = read_card(out)
    assert imported.weights_sha256 == card.weights_sha256  # the same tensors, loaded whole
    assert imported.model_kwargs == {"img_size": [side, side]}
    model, _ = load_model(out)  # rebuilt from its card at that size
    assert weights_sha256(model.to(memory_format=torch.contiguous_format)) == card.weights_sha256


def test_a_torch_checkpoint_with_nested_keys_and_ddp_prefixes(
    state: dict, weights: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt.pth"
    wrapped = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 7, "state_dict": wrapped, "arch": ARCH}, checkpoint)
    as_model = tmp_path / "model.pt"
    torch.save({"model": state}, as_model)
    hashes = set()
    for index, path in enumerate((checkpoint, as_model, weights)):
        out = tmp_path / f"t{index}"
        result = invoke("import-teacher timm:resnet10t --weights", path, "--out", out)
        assert result.exit_code == 0, result.output
        hashes.add(read_card(out).weights_sha256)
    assert hashes == {expected_hash(state)}  # the same weights, however they were stored


def test_class_names_and_num_classes(weights: Path, tmp_path: Path) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("ant\nbee\ncat\n")
    out = tmp_path / "named"
    made = invoke("import-teacher timm:resnet10t --weights", weights, "--classes", names,
                  "--num-classes 3 --out", out)  # fmt: skip
    assert made.exit_code == 0, made.output
    assert read_card(out).classes == ["ant", "bee", "cat"]


def test_a_local_dir_source_is_timms_hub_format_offline(state: dict, tmp_path: Path) -> None:
    """local-dir:PATH: config.json and model.safetensors as on the hub, read by timm; its
    pretrained_cfg (here 64 px, bilinear, crop_pct 0.9) is the teacher's preprocessing."""
    folder = hub_folder(tmp_path / "hub", state)
    out = tmp_path / "t"
    result = invoke(f"import-teacher local-dir:{folder} --out", out)
    assert result.exit_code == 0, result.output
    card = read_card(out)
    assert card.weights_sha256 == expected_hash(state)
    assert card.data_config["input_size"] == [3, 64, 64]
    assert (card.data_config["interpolation"], card.data_config["crop_pct"]) == ("bilinear", 0.9)


def hub_folder(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    config = {
        "architecture": ARCH,
        "num_classes": NUM_CLASSES,
        "pretrained_cfg": {
            "input_size": [3, 64, 64], "interpolation": "bilinear", "crop_pct": 0.9,
            "crop_mode": "center", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "num_classes": NUM_CLASSES, "first_conv": "conv1.0", "classifier": "fc",
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_hub_and_downloads_offline_are_one_clear_line(tmp_path: Path) -> None:
    fails(invoke("import-teacher hf-hub:timm/resnet10t.c3_in1k --out", tmp_path / "a"),
          "cannot read the model config of hf-hub:timm/resnet10t.c3_in1k")  # fmt: skip
    fails(invoke("import-teacher timm:resnet10t --out", tmp_path / "b"),
          "cannot fetch the pretrained weights of timm:resnet10t")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- the values: timm's own eval transform, recomputed independently -------------------------


def test_cached_values_equal_timms_own_eval_transform(state: dict, tmp_path: Path) -> None:
    folder = rgb_folder(tmp_path / "imgs")
    hub = hub_folder(tmp_path / "hub", state)
    teacher = tmp_path / "teacher"
    made = invoke(f"import-teacher local-dir:{hub} --out", teacher)
    assert made.exit_code == 0, made.output
    store = tmp_path / "c.zarr"
    cached = invoke("cache-teacher --data", folder, "--teacher", teacher, "--out", store,
                    "--temperature 1")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    manifest = read_manifest(store)
    member = manifest.teachers[0]
    assert "timm's eval transform" in manifest.preprocessing
    assert (
        member.data_config["crop_pct"] == 0.9 and member.data_config["interpolation"] == "bilinear"
    )
    # independently: timm's model from the same files, timm's data config and eval transform
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    paths = sorted((folder / "train").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = torch.log_softmax(model(batch), dim=-1)
    assert float(expected.min()) < -5  # the values are far from uniform
    values = load_soft_labels(store).log_probs()[:, 0]  # float16 as stored, by default
    assert values.shape == expected.shape
    # float16 keeps 11 significant bits: a relative 2**-11, and an absolute floor near 0
    torch.testing.assert_close(values, expected, rtol=2**-10, atol=1e-3)
    # and the input itself, through kdpipe's one path, is timm's to the last bit
    images = load_dataset(str(folder), "train").images[:]  # every row, decoded
    inputs = prepare_input(images, DataConfig.from_dict(member.data_config), torch.device("cpu"))
    torch.testing.assert_close(inputs, batch, rtol=0, atol=1e-6)


# --- every bad input: one line, a non-zero exit, nothing written damaged ---------------------


@pytest.fixture()
def existing(tmp_path: Path) -> Path:
    """A teacher run already at --out: a bad import must leave every byte of it."""
    out = tmp_path / "existing"
    made = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --out", out)
    assert made.exit_code == 0, made.output
    return out


def bad_files(folder: Path, state: dict) -> dict[str, Path]:
    folder.mkdir()
    files = {name: folder / name for name in
             ("strings.pth", "tensor.pth", "other.safetensors", "object.pkl", "junk.bin",
              "wide.safetensors")}  # fmt: skip
    torch.save({"arch": "resnet10t", "note": "no weights here"}, files["strings.pth"])
    torch.save(torch.zeros(4, 4), files["tensor.pth"])
    safetensors.torch.save_file(
        {"encoder.weight": torch.zeros(2, 2)}, str(files["other.safetensors"])
    )
    files["object.pkl"].write_bytes(
        pickle.dumps(Path("/etc/passwd"), protocol=2)
    )  # a pickle, not weights
    files["junk.bin"].write_bytes(b"these are not weights" * 10)
    wide = timm.create_model(ARCH, num_classes=7).state_dict()
    safetensors.torch.save_file(wide, str(files["wide.safetensors"]))
    return files


def test_every_bad_import_is_one_line_and_leaves_out_alone(
    existing: Path, weights: Path, state: dict, tmp_path: Path
) -> None:
    kept = snapshot(existing)
    files = bad_files(tmp_path / "bad", state)
    names = tmp_path / "two.txt"
    names.write_text("ant\nbee\n")
    cases = [
        ("timmm:resnet10t", "", "unknown teacher source 'timmm:resnet10t'"),
        ("timm:resnet10tz", "", "unknown architecture 'resnet10tz'"),
        ("timm:resnet10t.nope", "", "Invalid pretrained tag (nope)"),
        ("timm:resnet10t", f"--weights {tmp_path / 'missing.pth'}", "does not exist"),
        ("timm:resnet10t", f"--weights {files['strings.pth']}", "holds no state dict"),
        ("timm:resnet10t", f"--weights {files['tensor.pth']}", "holds no state dict"),
        ("timm:resnet10t", f"--weights {files['other.safetensors']}",
         "has no classifier 'fc': 86 missing (e.g. bn1.bias); 1 unexpected (e.g. encoder.weight)"),
        ("timm:resnet10t", f"--weights {files['object.pkl']}", "is not a weights file"),
        ("timm:resnet10t", f"--weights {files['junk.bin']}", "is not a weights file"),
        ("timm:resnet10t", f"--weights {weights} --num-classes 10",
         "predicts 3 classes, not the 10 asked for"),
        ("timm:resnet10t", f"--weights {weights} --classes {names}",
         "predicts 3 classes, not the 2 asked for"),
        ("timm:resnet34", f"--weights {weights}", "does not fit resnet34"),
    ]  # fmt: skip
    for source, options, message in cases:
        result = invoke("import-teacher", source, "--out", existing, options, "--overwrite")
        fails(result, message)
        assert snapshot(existing) == kept, source
    # a good import without --overwrite does not touch it either
    fails(invoke("import-teacher timm:resnet10t --weights", weights, "--out", existing),
          "already exists: choose another path or pass --overwrite")  # fmt: skip
    assert snapshot(existing) == kept


def test_a_head_that_does_not_fit_the_dataset_names_both(weights: Path, tmp_path: Path) -> None:
    folder = rgb_folder(tmp_path / "imgs")
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(timm.create_model(ARCH, num_classes=5).state_dict(), str(wide))
    teacher = tmp_path / "t5"
    assert invoke("import-teacher timm:resnet10t --weights", wide, "--out", teacher).exit_code == 0
    result = invoke("cache-teacher --data", folder, "--teacher", teacher, "--out", tmp_path / "c",
                    "--temperature 2")  # fmt: skip
    fails(result, f"teacher {teacher} has 5 classes but {folder} has 3")
    names = tmp_path / "names.txt"
    names.write_text("ant\nbee\ndog\n")
    named = tmp_path / "named"
    made = invoke("import-teacher timm:resnet10t --weights", weights, "--classes", names,
                  "--out", named)  # fmt: skip
    assert made.exit_code == 0, made.output
    fails(invoke("cache-teacher --data", folder, "--teacher", named, "--out", tmp_path / "c",
                 "--temperature 2"), "class 2: 'dog' vs 'cat'")  # fmt: skip
    assert not (tmp_path / "c").exists()


# --- fine-tuning, and the new user's path ----------------------------------------------------


def test_train_teacher_pretrained_fine_tunes_with_a_new_head(tmp_path: Path) -> None:
    """A 5-class pretrained resnet10t on a 3-class folder: timm's reset_classifier gives the
    head, the body starts from the weights, the preprocessing is the weights' own."""
    folder = rgb_folder(tmp_path / "imgs")
    torch.manual_seed(1)
    pretrained = timm.create_model(ARCH, num_classes=5).state_dict()
    weights = tmp_path / "five.safetensors"
    safetensors.torch.save_file(pretrained, str(weights))
    out = tmp_path / "ft"
    result = invoke("train-teacher --pretrained timm:resnet10t --weights", weights, "--data",
                    folder, "--epochs 1 --lr 1e-9 --batch-size 9 --out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    card = read_card(out)
    assert card.architecture == ARCH and card.num_classes == 3
    assert card.classes == ["ant", "bee", "cat"]
    assert card.data_config["input_size"] == [3, 176, 176]
    assert card.data_config["interpolation"] == "bicubic"
    assert card.source["weights_file"] == str(weights)
    model, _ = load_model(out)
    trained = model.state_dict()
    assert trained["fc.weight"].shape == (3, 512)
    # the body is the pretrained one (an lr of 1e-9 moves it by nothing), not a fresh init
    torch.testing.assert_close(trained["conv1.0.weight"], pretrained["conv1.0.weight"])
    assert json.loads((out / "config.json").read_text())["pretrained"] == "timm:resnet10t"


def test_train_teacher_pretrained_takes_the_weights_own_preprocessing(
    weights: Path, tmp_path: Path
) -> None:
    """Issue 27.2 for a fine-tune: --data-config gives a weights file's own preprocessing
    (its 32 px, not the tag's 176), recorded in model.json; a weights file given none keeps
    the tag's and the run says so, as import-teacher does."""
    folder = rgb_folder(tmp_path / "imgs")
    config_file = tmp_path / "data-config.json"
    config_file.write_text(
        json.dumps(
            {
                "input_size": [3, 32, 32],
                "interpolation": "bilinear",
                "crop_pct": 1.0,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
            }
        )
    )
    start = (f"train-teacher --pretrained timm:resnet10t --data {folder} --epochs 1 "
             "--batch-size 9 --weights")  # fmt: skip
    out = tmp_path / "ft"
    result = invoke(start, weights, "--data-config", config_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    data = read_card(out).data_config
    assert data["input_size"] == [3, 32, 32] and data["interpolation"] == "bilinear"
    assert data["mean"] == [0.5] * 3 and data["crop_pct"] == 1.0
    loud = invoke(start, weights, "--out", tmp_path / "loud")
    assert loud.exit_code == 0 and "warning" in loud.output and "176x176" in loud.output
    # and the tag's 176 px is far above the data's 40 x 52: said where it is used
    assert "takes 176x176 px and the data is 40x52: each image is resized 4.4x" in loud.output
    cached = invoke("cache-teacher --temperature 2 --data", folder, "--teacher", tmp_path / "loud",
                    "--out", tmp_path / "c.zarr")  # fmt: skip
    assert cached.exit_code == 0 and "resized 4.4x" in cached.output, cached.output
    assert "import-teacher --input-size or --data-config" in cached.output
    quiet = invoke("cache-teacher --temperature 2 --data", folder, "--teacher", out, "--out",
                   tmp_path / "q.zarr")  # fmt: skip
    assert quiet.exit_code == 0 and "warning" not in quiet.output, quiet.output
    fails(invoke(f"train-teacher --model kd_cnn --data {folder} --epochs 1 --data-config",
                 config_file, "--out", tmp_path / "r"),
          "--data-config goes with --pretrained SOURCE")  # fmt: skip
    config_file.write_text(json.dumps({"input_size": [3, 32, 32], "size": 3}))
    fails(
        invoke(start, weights, "--data-config", config_file, "--out", tmp_path / "r"),
        "unknown data config key(s) size",
    )
    assert not (tmp_path / "r").exists()


def test_bad_pretrained_starts_are_one_line(weights: Path, tmp_path: Path) -> None:
    folder = rgb_folder(tmp_path / "imgs")
    start = f"train-teacher --data {folder} --epochs 1 --out {tmp_path / 'r'}"
    fails(invoke(start, "--weights", weights, "--model kd_cnn"), "--weights goes with --pretrained")
    fails(invoke(start, "--pretrained timm:resnet10t --model resnet18 --weights", weights),
          "is a resnet10t, not --model resnet18")  # fmt: skip
    fails(invoke(start, "--pretrained timm:resnet10t --weights", tmp_path / "none.pth"),
          "does not exist")  # fmt: skip
    fails(invoke(start), "Missing option '--model' (or --pretrained SOURCE)", 2)
    fails(invoke(start, "--pretrained timm:resnet10t --input-size 64 --weights", weights),
          "--input-size and --pretrained: a pretrained model takes its own input size")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_source_teacher_straight_into_cache_teacher_and_a_student(
    state: dict, weights: Path, tmp_path: Path
) -> None:
    """cache-teacher --teacher local-dir:PATH imports it on the fly (an ensemble with an
    imported run directory here), records its source; a student learns from the cache and
    is evaluated on the folder."""
    folder = rgb_folder(tmp_path / "imgs")
    hub = hub_folder(tmp_path / "hub", state)
    imported = tmp_path / "imported"
    torch.manual_seed(5)  # other weights: the same weights twice is no ensemble (issue 24)
    weights = tmp_path / "other.safetensors"
    safetensors.torch.save_file(timm.create_model(ARCH, num_classes=NUM_CLASSES).state_dict(),
                                str(weights))  # fmt: skip
    assert (
        invoke("import-teacher timm:resnet10t --weights", weights, "--out", imported).exit_code == 0
    )
    store = tmp_path / "c.zarr"
    made = invoke("cache-teacher --data", folder, "--teacher", f"local-dir:{hub}", "--teacher",
                  imported, "--out", store, "--temperature 2")  # fmt: skip
    assert made.exit_code == 0, made.output
    manifest = read_manifest(store)
    on_the_fly, from_run = manifest.teachers
    assert (
        on_the_fly.run_dir == f"local-dir:{hub}"
        and on_the_fly.source["source"] == f"local-dir:{hub}"
    )
    assert from_run.source["weights_file"] == str(weights)
    # two weights, two preprocessings (64 px bilinear, 176 px bicubic): two members
    assert on_the_fly.weights_sha256 != from_run.weights_sha256
    assert on_the_fly.data_config != from_run.data_config
    assert manifest.classes == ["ant", "bee", "cat"]
    verified = invoke("verify", store, "--data", folder, "--recompute 3 --teacher",
                      f"local-dir:{hub}", "--teacher", imported)  # fmt: skip
    assert verified.exit_code == 0, verified.output
    student = tmp_path / "s"
    trained = invoke("train-student --model kd_cnn --epochs 1 --alpha 0.5 --data", folder,
                     "--cache", store, "--out", student)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    scored = invoke("evaluate", student, "--data", folder, "--teacher", imported)
    assert scored.exit_code == 0, scored.output
    chain = invoke("lineage", student, "--data-root", tmp_path)
    assert chain.exit_code == 0, chain.output
    assert "imported on the fly" in chain.output and "file hash recomputed" in chain.output


def test_a_grayscale_dataset_fine_tunes_an_rgb_source(state: dict, tmp_path: Path) -> None:
    """timm adapts the first convolution to one channel; mean and std become the channel
    means of the source's."""
    folder = tmp_path / "gray"
    for split in ("train", "test"):
        for index, name in enumerate(("ant", "bee", "cat")):
            (folder / split / name).mkdir(parents=True)
            Image.new("L", (20, 20), 40 + 80 * index).save(folder / split / name / "0.png")
    hub = hub_folder(tmp_path / "hub", state)
    out = tmp_path / "g"
    made = invoke(f"train-teacher --pretrained local-dir:{hub} --data", folder,
                  "--epochs 1 --out", out)  # fmt: skip
    assert made.exit_code == 0, made.output
    config = read_card(out).data_config
    assert config["input_size"] == [1, 64, 64]
    assert config["mean"] == [pytest.approx(0.4)] and config["std"] == [pytest.approx(0.25)]
    model, _ = load_model(out)
    assert model.conv1[0].weight.shape[1] == 1


def test_records_without_the_new_fields_keep_their_digests(teacher_run: Path) -> None:
    """A run trained by kdpipe has no source and no eval fields: its card (and so its card
    digest and teacher_id) is the JSON it was before these existed, byte for byte."""
    written = json.loads((teacher_run / "model.json").read_text())
    card = read_card(teacher_run)
    assert "source" not in written and card.to_dict() == written
    assert set(written["data_config"]) == {"input_size", "mean", "std"}
    assert DataConfig.from_dict(written["data_config"]).to_dict() == written["data_config"]


def test_an_imported_teacher_exports_with_its_own_preprocessing(
    weights: Path, tmp_path: Path
) -> None:
    folder = rgb_folder(tmp_path / "imgs")
    teacher = tmp_path / "t"
    assert (
        invoke("import-teacher timm:resnet10t --weights", weights, "--out", teacher).exit_code == 0
    )
    onnx_file = tmp_path / "t.onnx"
    fails(invoke("export", teacher, "--out", onnx_file), "give --data", 1)
    exported = invoke("export", teacher, "--data", folder, "--out", onnx_file, "--check-rows 3")
    assert exported.exit_code == 0, exported.output
    scored = invoke("evaluate", onnx_file, "--data", folder)
    assert scored.exit_code == 0, scored.output
    card = read_onnx_card(onnx_file)
    assert card.classes == ["ant", "bee", "cat"]
    assert (
        card.preprocessing["crop_pct"] == 0.875 and "eval transform" in card.preprocessing["recipe"]
    )


def test_an_hf_hub_model_from_the_hubs_own_cache(state: dict, tmp_path: Path) -> None:
    """hf-hub:ORG/NAME as timm loads it, offline: the files where huggingface_hub keeps a
    download (HF_HUB_CACHE/models--ORG--NAME/snapshots/REV, refs/main naming REV)."""
    import huggingface_hub.constants as hub

    repo = Path(hub.HF_HUB_CACHE) / "models--kdpipe-test--tiny-resnet"
    revision = "0" * 40
    hub_folder(repo / "snapshots" / revision, state)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "t"
    made = invoke("import-teacher hf-hub:kdpipe-test/tiny-resnet --classes", names_file(tmp_path),
                  "--out", out)  # fmt: skip
    assert made.exit_code == 0, made.output
    card = read_card(out)
    assert card.source["source"] == "hf-hub:kdpipe-test/tiny-resnet"
    assert card.weights_sha256 == expected_hash(state) and card.classes == ["ant", "bee", "cat"]
    assert card.data_config["input_size"] == [3, 64, 64] and card.data_config["crop_pct"] == 0.9
    folder = rgb_folder(tmp_path / "imgs")
    store = tmp_path / "c.zarr"
    cached = invoke("cache-teacher --data", folder, "--teacher hf-hub:kdpipe-test/tiny-resnet",
                    "--out", store, "--temperature 2")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    member = read_manifest(store).teachers[0]
    assert member.run_dir == "hf-hub:kdpipe-test/tiny-resnet"
    assert member.weights_sha256 == card.weights_sha256
    # the SOURCE on the fly and its imported run directory are one teacher: the same ids
    again = tmp_path / "again.zarr"
    cached = invoke("cache-teacher --data", folder, "--teacher", out, "--out", again,
                    "--temperature 2")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    assert read_manifest(again).cache_id == read_manifest(store).cache_id


def names_file(folder: Path) -> Path:
    path = folder / "classes.txt"
    path.write_text("ant\nbee\ncat\n")
    return path


class Killed(Exception):
    pass


def test_a_killed_fine_tune_resumes_to_the_same_weights(weights: Path, tmp_path: Path) -> None:
    """--resume of a --pretrained run: config.json names the source and the file, the
    checkpoint holds the rest; it ends as an uninterrupted run does."""
    from kdpipe.train import TrainConfig, resume_training, train_teacher

    folder = rgb_folder(tmp_path / "imgs")

    def config(out: Path) -> TrainConfig:
        return TrainConfig(model=None, data=str(folder), out=str(out), epochs=2, batch_size=9,
                           lr=0.01, pretrained="timm:resnet10t", weights=str(weights))  # fmt: skip

    def kill_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Killed

    whole = train_teacher(config(tmp_path / "whole"))
    with pytest.raises(Killed):
        train_teacher(config(tmp_path / "cut"), log=kill_after_epoch_1)
    resumed = resume_training(tmp_path / "cut")
    assert resumed.weights_sha256 == whole.weights_sha256
    assert resumed.source == whole.source and resumed.data_config == whole.data_config


def test_bad_source_teachers_in_cache_teacher_are_one_line(tmp_path: Path) -> None:
    folder = rgb_folder(tmp_path / "imgs")
    store = tmp_path / "c.zarr"
    start = f"cache-teacher --data {folder} --temperature 2 --out {store} --teacher"
    fails(invoke(start, "timmm:resnet10t"), "unknown teacher source 'timmm:resnet10t'")
    fails(invoke(start, "timm:resnet10t"), "cannot fetch the pretrained weights of timm:resnet10t")
    fails(invoke(start, "hf-hub:nobody/nothing"), "cannot read the model config of hf-hub:")
    fails(invoke(start, f"local-dir:{tmp_path / 'nowhere'}"), "cannot read the model config")
    fails(invoke(start, tmp_path / "no-run"), "does not exist")
    assert not store.exists()


# --- issue 27 and 24: teachers people bring ---------------------------------------------------


def saved_for_hf(folder: Path, state: dict, **options: object) -> Path:
    """A folder written by timm's own save_for_hf (model_args with num_classes, in_chans)."""
    from timm.models import save_for_hf

    model = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    model.load_state_dict(state)
    save_for_hf(model, str(folder), **options)
    assert "num_classes" in json.loads((folder / "config.json").read_text())["model_args"]
    return folder


def test_a_save_for_hf_folder_imports_caches_and_names_its_classes(
    state: dict, tmp_path: Path
) -> None:
    folder = rgb_folder(tmp_path / "imgs", count=1)
    labelled = saved_for_hf(tmp_path / "hf", state,
                            model_config={"label_names": ["ant", "bee", "cat"]},
                            data_config={"input_size": (3, 32, 32)})  # fmt: skip
    teacher = tmp_path / "t"
    made = invoke(f"import-teacher local-dir:{labelled} --classes", names_file(tmp_path),
                  "--out", teacher)  # fmt: skip
    assert made.exit_code == 0, made.output
    card = read_card(teacher)
    assert "num_classes" not in card.model_kwargs and "in_chans" not in card.model_kwargs
    cached = invoke("cache-teacher --data", folder, "--teacher", teacher, "--out",
                    tmp_path / "c.zarr", "--temperature 2")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    # without --classes: the config's label_names; safetensors this time
    plain = saved_for_hf(tmp_path / "hf2", state, safe_serialization=True,
                         model_config={"label_names": ["ant", "bee", "cat"]})  # fmt: skip
    named = tmp_path / "named"
    assert invoke(f"import-teacher local-dir:{plain} --out", named).exit_code == 0
    assert read_card(named).classes == ["ant", "bee", "cat"]
    assert read_card(named).weights_sha256 == expected_hash(state)
    other = tmp_path / "other.txt"
    other.write_text("ant\ncat\nbee\n")
    fails(invoke(f"import-teacher local-dir:{plain} --classes", other, "--out", tmp_path / "x"),
          "class 1: 'cat' vs 'bee'")  # fmt: skip


def test_given_preprocessing_is_timms_own_transform(weights: Path, state: dict,
                                                    tmp_path: Path) -> None:  # fmt: skip
    folder = rgb_folder(tmp_path / "imgs", count=1, size=(36, 44))
    teacher = tmp_path / "t"
    made = invoke("import-teacher timm:resnet10t --weights", weights, "--out", teacher,
                  "--input-size 32 --mean 0.5,0.4,0.3 --std 0.2 --interpolation bilinear "
                  "--crop-pct 0.8")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "warning" not in made.output
    given = {"img_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2], "interpolation": "bilinear",
             "crop_pct": 0.8}  # fmt: skip
    config_file = tmp_path / "data-config.json"
    config_file.write_text(json.dumps({**given, "img_size": None, "input_size": [3, 32, 32]}))
    again = tmp_path / "again"
    made = invoke("import-teacher timm:resnet10t --weights", weights, "--data-config",
                  config_file, "--out", again)  # fmt: skip
    assert made.exit_code == 0, made.output
    assert read_card(again).data_config == read_card(teacher).data_config
    store = tmp_path / "c.zarr"
    cached = invoke("cache-teacher --data", folder, "--teacher", teacher, "--out", store,
                    "--temperature 1 --dtype float32")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    model = timm.create_model(ARCH, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(state)
    config = timm.data.resolve_data_config(args=given, pretrained_cfg=model.pretrained_cfg)
    transform = timm.data.create_transform(**config, is_training=False)
    paths = sorted((folder / "train").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = torch.log_softmax(model(batch), dim=-1)
    assert tuple(batch.shape[-2:]) == (32, 32)
    torch.testing.assert_close(load_soft_labels(store).log_probs()[:, 0], expected,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # a weights file given no preprocessing: the tag's, said out loud
    loud = invoke("import-teacher timm:resnet10t --weights", weights, "--out", tmp_path / "l")
    assert loud.exit_code == 0 and "warning" in loud.output and "176x176" in loud.output
    for options, message in (("--std 0,1,1", "std [0.0, 1.0, 1.0] is not a list of numbers > 0"),
                             ("--interpolation cubic", "interpolation 'cubic' is not one of"),
                             ("--mean 0.5,0.5", "need 1 or 3 values")):  # fmt: skip
        fails(invoke("import-teacher timm:resnet10t --weights", weights, options, "--out",
                     tmp_path / "bad"), message)  # fmt: skip
    config_file.write_text(json.dumps({"input_size": [3, 32, 32], "size": 3}))
    fails(
        invoke(
            "import-teacher timm:resnet10t --weights",
            weights,
            "--data-config",
            config_file,
            "--out",
            tmp_path / "bad",
        ),
        "unknown data config key(s) size",
    )
    assert not (tmp_path / "bad").exists()


def test_no_download_fails_at_once_and_names_hf_hub_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Offline (the autouse fixture) and empty cache: one line naming HF_HUB_OFFLINE; with
    the flag unset and a hub that does not answer, the line says to set it."""
    fails(invoke("import-teacher timm:resnet10t --out", tmp_path / "a"),
          "HF_HUB_OFFLINE is set and huggingface_hub's cache")  # fmt: skip
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    for source, what in (("timm:resnet10t", "cannot fetch the pretrained weights"),
                         ("hf-hub:nobody/nothing", "cannot read the model config")):  # fmt: skip
        result = invoke("import-teacher", source, "--out", tmp_path / "b")
        fails(result, f"{what} of {source}: 127.0.0.1 cannot be reached")
        assert "set HF_HUB_OFFLINE=1" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lineage_names_where_the_weights_came_from(
    state: dict, weights: Path, tmp_path: Path, teacher_run: Path
) -> None:
    import huggingface_hub.constants as hub

    revision = "1" * 40
    for repo_name, files in (
        ("models--timm--resnet10t.c3_in1k",
         {"model.safetensors": timm.create_model(ARCH).state_dict()}),
        ("models--kdpipe-test--tiny-resnet", None),
    ):  # fmt: skip
        repo = Path(hub.HF_HUB_CACHE) / repo_name
        snapshot_dir = repo / "snapshots" / revision
        if files is None:
            hub_folder(snapshot_dir, state)
        else:
            snapshot_dir.mkdir(parents=True)
            safetensors.torch.save_file(files["model.safetensors"],
                                        str(snapshot_dir / "model.safetensors"))  # fmt: skip
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    folder = saved_for_hf(tmp_path / "hf", state, safe_serialization=True)
    expected = {
        "timm:resnet10t": "weights from timm's download of resnet10t.c3_in1k",
        "hf-hub:kdpipe-test/tiny-resnet": "weights from the Hugging Face hub repository "
        "kdpipe-test/tiny-resnet",
        f"local-dir:{folder}": f"weights from the local folder {folder}: file hash recomputed",
        f"timm:resnet10t --weights {weights}": f"weights from the file {weights}: file hash",
    }
    for index, (source, detail) in enumerate(expected.items()):
        out = tmp_path / f"t{index}"
        made = invoke("import-teacher", source, "--out", out)
        assert made.exit_code == 0, made.output
        chain = json.loads(invoke("lineage", out, "--format json").output)
        links = [row for row in chain if row["link"] == "source"]
        assert len(links) == 1 and links[0]["detail"].startswith(detail), (source, links)
    # a kdpipe run: its weights hash, and no pretrained source
    chain = json.loads(invoke("lineage", teacher_run, "--format json").output)
    assert [row["link"] for row in chain] == ["teacher", "dataset"]
    assert chain[0]["detail"] == "weights hash recomputed"


def test_the_same_weights_twice_is_not_an_ensemble(weights: Path, tmp_path: Path) -> None:
    import shutil

    folder = rgb_folder(tmp_path / "imgs", count=1)
    one = tmp_path / "one"
    assert invoke("import-teacher timm:resnet10t --input-size 32 --weights", weights,
                  "--out", one).exit_code == 0  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    resized = tmp_path / "resized"  # the same weights at another preprocessing
    assert invoke("import-teacher timm:resnet10t --input-size 40 --weights", weights,
                  "--out", resized).exit_code == 0  # fmt: skip
    store = tmp_path / "c.zarr"
    for other in (one, copy, resized):
        fails(invoke("cache-teacher --data", folder, "--teacher", one, "--teacher", other,
                     "--out", store, "--temperature 2"), "have the same weights")  # fmt: skip
    assert not store.exists()
    fails(invoke("evaluate", one, "--data", folder, "--teacher", one, "--teacher", copy),
          "have the same weights")  # fmt: skip


def class_folder(root: Path, names: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )
    return root


def test_class_names_are_compared_wherever_a_model_meets_data(tmp_path: Path) -> None:
    from kdpipe.data.datasets import class_mismatch

    ours = class_folder(tmp_path / "ours", ("cat", "dog", "fox"))
    theirs = class_folder(tmp_path / "theirs", ("bat", "cat", "dog"))
    teacher = tmp_path / "t"
    made = invoke("train-teacher --model kd_cnn_tiny --epochs 1 --data", ours, "--out", teacher)
    assert made.exit_code == 0, made.output
    differ = "class 0: 'cat' vs 'bat'; class 1: 'dog' vs 'cat'; class 2: 'fox' vs 'dog'"
    fails(invoke("cache-teacher --data", theirs, "--teacher", teacher, "--out",
                 tmp_path / "c.zarr", "--temperature 2"), differ)  # fmt: skip
    assert not (tmp_path / "c.zarr").exists()
    fails(invoke("evaluate", teacher, "--data", theirs), differ)
    fails(
        invoke(
            "distill-online --model kd_cnn_tiny --epochs 1 --alpha 0.5 --temperature 2 --teacher",
            teacher,
            "--data",
            theirs,
            "--out",
            tmp_path / "o",
        ),
        differ,
    )
    # a cache whose teacher names its classes otherwise (made before the check existed)
    store = tmp_path / "ok.zarr"
    made = invoke("cache-teacher --data", ours, "--teacher", teacher, "--out", store,
                  "--temperature 2")  # fmt: skip
    assert made.exit_code == 0, made.output
    from conftest import edit_manifest

    edit_manifest(store, classes=["cat", "fox", "dog"])
    fails(
        invoke(
            "train-student --model kd_cnn_tiny --epochs 1 --alpha 0.5 --data",
            ours,
            "--cache",
            store,
            "--out",
            tmp_path / "s",
        ),
        "class 1: 'fox' vs 'dog'; class 2: 'dog' vs 'fox'",
    )
    assert "another order" in class_mismatch(["a", "b"], ["b", "a"], "x", "y")
    assert class_mismatch(["a"], ["a", "b"], "x", "y") == "x has 1 classes, y has 2"


def test_weak_answers_of_import_teacher_are_one_clear_line(state: dict, tmp_path: Path) -> None:
    text = tmp_path / "teacher.pth"
    text.write_text("epoch 3, accuracy 0.39\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path, message in ((text, "it is a text file (it starts 'epoch 3, accuracy 0.39')"),
                          (empty, "it is empty")):  # fmt: skip
        fails(invoke("import-teacher timm:resnet10t --weights", path, "--out", tmp_path / "o"),
              f"{path} is not a weights file: {message}")  # fmt: skip
    cases = {
        "broken": ('{"architecture": "resnet10t", ', "config.json is not valid JSON"),
        "listed": ("[1, 2]", "config.json holds a JSON list, not the object"),
        "nameless": ('{"num_classes": 3}', "config.json has no 'architecture'"),
        "cfg-list": ('{"architecture": "resnet10t", "pretrained_cfg": []}',
                     "'pretrained_cfg' is a list, not a JSON object"),
    }  # fmt: skip
    for name, (config, message) in cases.items():
        folder = hub_folder(tmp_path / name, state)
        (folder / "config.json").write_text(config)
        result = invoke(f"import-teacher local-dir:{folder} --out", tmp_path / "o")
        fails(result, f"{folder / 'config.json'}")
        assert message in result.output and "offline?" not in result.output, result.output
    assert not (tmp_path / "o").exists()
