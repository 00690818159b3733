"""The command line end to end, and every bad input with its message."""

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result
from conftest import cache, edit_manifest, invoke, student
from kdpipe.cli import main
from kdpipe.models.runs import read_card
from kdpipe.train.entry import chance_note
from PIL import Image


def manifest_of(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["kdpipe"]


def test_teacher_cache_student_evaluate(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    # the student never loads the teacher: remove the teacher's run directory first
    moved = tmp_path / "teacher-elsewhere"
    shutil.copytree(teacher_run, moved)
    shutil.rmtree(teacher_run)
    try:
        result = student(train_cache, tmp_path / "kd", "--alpha 0.2")
    finally:
        shutil.copytree(moved, teacher_run)
    assert result.exit_code == 0, result.output
    run = tmp_path / "kd"
    files = {p.name for p in run.iterdir()}
    assert files == {"model.safetensors", "model.json", "config.json", "metrics.csv"}
    card = read_card(run)
    manifest = manifest_of(train_cache)
    assert card.lineage["cache_id"] == manifest["cache_id"]
    assert card.lineage["teacher_id"] == manifest["teacher_id"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert {"loss", "hard_loss", "soft_loss", "test_accuracy", "test_errors"} <= set(metrics)
    assert metrics["soft_loss"].notna().all()

    test_cache = tmp_path / "test.zarr"
    assert cache(teacher_run, test_cache, "--split test --temperature 1").exit_code == 0
    result = invoke("evaluate", run, "--data synthetic --format json --cache", test_cache)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["samples"] == 200 and 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1
    assert row["teacher_agreement"] is not None and row["params"] == 5435
    assert row["latency_ms"] > 0 and row["throughput_img_s"] > 0
    by_teacher = invoke("evaluate", run, "--data synthetic --format csv --teacher", teacher_run)
    frame = pd.read_csv(io.StringIO(by_teacher.output))
    assert frame.loc[0, "teacher_agreement"] == row["teacher_agreement"]


def test_same_seed_same_student(train_cache: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert student(train_cache, tmp_path / name, "--alpha 0.5 --seed 3").exit_code == 0
    assert read_card(tmp_path / "a").weights_sha256 == read_card(tmp_path / "b").weights_sha256
    first, second = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("a", "b"))
    pd.testing.assert_frame_equal(first.drop(columns="seconds"), second.drop(columns="seconds"))


def test_alpha_one_is_the_hard_label_baseline(train_cache: Path, tmp_path: Path) -> None:
    assert student(train_cache, tmp_path / "hard", "--alpha 1").exit_code == 0
    metrics = pd.read_csv(tmp_path / "hard" / "metrics.csv")
    assert metrics["loss"].round(6).tolist() == metrics["hard_loss"].round(6).tolist()


def test_temperature_override_retempers(train_cache: Path, tmp_path: Path) -> None:
    assert student(train_cache, tmp_path / "t8", "--alpha 0 --temperature 8").exit_code == 0
    lineage = read_card(tmp_path / "t8").lineage
    assert lineage["temperature"] == 8.0 and lineage["cache_temperature"] == 4.0


def test_ensemble_cache(teacher_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "teacher2"
    trained = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --out", other)
    assert trained.exit_code == 0
    result = cache(teacher_run, tmp_path / "ens.zarr", f"--temperature 2 --teacher {other}")
    assert result.exit_code == 0, result.output
    manifest = manifest_of(tmp_path / "ens.zarr")
    assert [t["architecture"] for t in manifest["teachers"]] == ["kd_cnn", "kd_mlp_30x2"]
    assert manifest["combine"] == "mean-probs"


# --- bad input: one clear line, a non-zero exit, nothing damaged ----------------------------


def fails(result: Result, pattern: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert re.search(pattern, result.output), result.output
    assert "Traceback" not in result.output


def test_unknown_architecture(train_cache: Path, tmp_path: Path) -> None:
    result = invoke(
        "train-student --model nope_net --data synthetic --alpha 0.5 --epochs 1 --cache",
        train_cache,
        "--out",
        tmp_path / "s",
    )
    fails(result, "unknown architecture 'nope_net'")
    assert not (tmp_path / "s").exists()


def test_bad_run_directories(tmp_path: Path, teacher_run: Path) -> None:
    out = tmp_path / "c.zarr"
    fails(cache(tmp_path / "missing", out), "run directory .*missing does not exist")
    (tmp_path / "empty").mkdir()
    fails(cache(tmp_path / "empty", out), "is not a kdpipe run directory")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    fails(cache(unfinished, out), "unfinished run .*training did not complete")
    edited = tmp_path / "edited"
    shutil.copytree(teacher_run, edited)
    (edited / "model.json").write_text((edited / "model.json").read_text()[:40])
    fails(cache(edited, out), "model.json is not valid JSON")
    swapped = tmp_path / "swapped"
    shutil.copytree(teacher_run, swapped)
    card = json.loads((swapped / "model.json").read_text())
    card["weights_sha256"] = "0" * 64
    (swapped / "model.json").write_text(json.dumps(card))
    fails(cache(swapped, out), "does not match model.json: weights hash")
    assert not out.exists()


def test_cache_of_another_dataset(teacher_run: Path, tmp_path: Path) -> None:
    test_cache = tmp_path / "test.zarr"
    assert cache(teacher_run, test_cache, "--split test --temperature 2").exit_code == 0
    result = student(test_cache, tmp_path / "s")
    fails(result, r"made from another dataset than synthetic train: count 200 \(cache\) != 600")
    assert not (tmp_path / "s").exists()


def test_class_count_mismatch(teacher_run: Path, tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("x", "y"):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            Image.new("L", (12, 12), 50).save(tmp_path / "imgs" / split / name / "0.png")
    result = invoke(
        "cache-teacher --temperature 2 --teacher",
        teacher_run,
        "--data",
        tmp_path / "imgs",
        "--out",
        tmp_path / "c.zarr",
    )
    fails(result, "has 5 classes but .*imgs has 2")


@pytest.mark.parametrize(
    "options,pattern",
    [
        (
            "--alpha 0.5 --temperature 0",
            "Invalid value for '--temperature': --temperature must be a number from 0.01 to 1000, "
            "not 0.0",
        ),
        ("--alpha 0.5 --temperature -1", r"Invalid value for '--temperature'"),
        ("--alpha 1.5", r"Invalid value for '--alpha': --alpha must be in \[0, 1\], not 1.5"),
        ("--alpha -0.1", r"Invalid value for '--alpha'"),
    ],
)
def test_out_of_range_options(
    train_cache: Path, tmp_path: Path, options: str, pattern: str
) -> None:
    fails(student(train_cache, tmp_path / "s", options), pattern, code=2)
    assert not (tmp_path / "s").exists()


def test_library_rejects_bad_values_too(train_cache: Path, tmp_path: Path) -> None:
    from kdpipe.base.errors import UsageError
    from kdpipe.train import TrainConfig, train_student

    for bad, message in (
        ({"alpha": 2.0}, "--alpha must be in"),
        ({"temperature": 0.0}, "--temperature must be a number from 0.01 to 1000, not 0.0"),
    ):
        settings = {"alpha": 0.5, **bad}
        config = TrainConfig(
            model="kd_mlp_30x2", data="synthetic", out=str(tmp_path / "s"), epochs=1,
            cache=str(train_cache), **settings,
        )  # fmt: skip
        with pytest.raises(UsageError, match=message):
            train_student(config)


def test_existing_output_is_kept(train_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails(student(train_cache, out), "already exists: .*--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    existing = tmp_path / "exists.zarr"
    shutil.copytree(train_cache, existing)
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    # a bad input with --overwrite still deletes nothing
    fails(cache(tmp_path / "nope", existing, "--temperature 2 --overwrite"), "does not exist")
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before
    # --overwrite replaces only what kdpipe wrote (issue 24): a folder of a person's files stays
    fails(student(train_cache, out, "--alpha 0.5 --overwrite"), "is not a run directory")
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert student(train_cache, out, "--alpha 0.5").exit_code == 0  # an empty folder is free
    assert student(train_cache, out, "--alpha 0.5 --overwrite").exit_code == 0  # a run: replaced


def test_not_a_cache_and_incomplete_cache(train_cache: Path, tmp_path: Path) -> None:
    fails(student(tmp_path, tmp_path / "s"), "is not a kdpipe cache")
    partial = tmp_path / "partial.zarr"
    shutil.copytree(train_cache, partial)
    edit_manifest(partial, status="writing")
    fails(student(partial, tmp_path / "s"), "is not complete")
    assert not (tmp_path / "s").exists()


def test_nan_teacher_outputs_stop_the_pass(teacher_run: Path, tmp_path: Path) -> None:
    import safetensors.torch
    from kdpipe.models.registry import create_model, weights_sha256

    broken = tmp_path / "nan-teacher"
    shutil.copytree(teacher_run, broken)
    state = safetensors.torch.load_file(str(broken / "model.safetensors"))
    state["head.bias"][:] = float("nan")
    safetensors.torch.save_file(state, str(broken / "model.safetensors"))
    card = read_card(broken)
    model = create_model(
        card.architecture, num_classes=card.num_classes, data_config=card.data,
        model_kwargs=card.model_kwargs,
    )  # fmt: skip
    model.load_state_dict(state)
    meta = json.loads((broken / "model.json").read_text())
    meta["weights_sha256"] = weights_sha256(model)  # a consistent, but broken, teacher
    (broken / "model.json").write_text(json.dumps(meta))
    result = cache(broken, tmp_path / "c.zarr")
    fails(result, r"NaN or Inf for sample\(s\) 0, 1, 2, .* and \d+ more")
    assert manifest_of(tmp_path / "c.zarr")["status"] == "writing"


def test_divergence_stops_training_with_advice(train_cache: Path, tmp_path: Path) -> None:
    result = student(train_cache, tmp_path / "s", "--alpha 0.1 --lr 1e6")
    fails(result, r"training diverged in epoch 1, batch \d+: the loss is (nan|inf); lower --lr")
    assert not (tmp_path / "s" / "model.json").exists()


def test_a_finite_loss_that_explodes_stops_training_with_advice(
    train_cache: Path, tmp_path: Path
) -> None:
    """A loss that grows a hundredfold but stays finite left the basin: the run stops
    (before, it went on at chance and exited 0), naming --clip-grad and --lr."""
    result = student(train_cache, tmp_path / "s", "--alpha 0.5 --lr 10")
    fails(result, r"training diverged in epoch 1, batch \d+: the loss is [0-9.e+]+, over 100 "
                  r"times its start \([0-9.]+\), in \d+ batch\(es\); clip the gradient "
                  r"\(--clip-grad 1\) or lower --lr \(now 10\)")  # fmt: skip
    assert not (tmp_path / "s" / "model.json").exists()
    clipped = student(train_cache, tmp_path / "c", "--alpha 0.5 --lr 10 --clip-grad 1")
    assert clipped.exit_code == 0, clipped.output


def test_a_student_left_at_chance_is_named(train_cache: Path, tmp_path: Path) -> None:
    """A run that finishes at chance while its teacher is well above it says so (the
    rule, on a real run's card with its result set: a real run's accuracy near the bar
    would make the test hang on float noise)."""
    fine = student(train_cache, tmp_path / "f", "--alpha 0.5")
    assert fine.exit_code == 0 and "at chance" not in fine.output, fine.output
    card = read_card(tmp_path / "f")
    assert card.num_classes == 5 and chance_note(card, 0.99, 0.05) is None  # it learned
    stuck = replace(card, result={**card.result, "test_accuracy": 0.255})
    assert chance_note(stuck, 0.99, 2) == (
        "warning: the student's test accuracy 0.2550 is at chance (5 classes: 0.2000) while "
        "its teacher's is 0.9900 on the cache: it learned nothing; see metrics.csv for a loss "
        "that grew, then clip the gradient (--clip-grad 1) or lower --lr (was 2)"
    )
    assert chance_note(stuck, 0.5, 2) is None  # a teacher near chance too: nothing to say
    assert chance_note(replace(card, result=None), 0.99, 2) is None  # no test split scored


def test_every_command_has_help_and_is_documented() -> None:
    """docs/cli.md quotes each --help verbatim: an option added, renamed or with a
    new default fails here until the reference says so too."""
    reference = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).output.rstrip() in reference
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and command.help, name
        assert f"## kdpipe {name}" in reference, f"docs/cli.md does not document {name}"
        assert result.output.rstrip() in reference, (
            f"docs/cli.md: the --help block of {name} differs from the program's:\n{result.output}"
        )


def test_image_folder_end_to_end(tmp_path: Path) -> None:
    """A user's RGB image folder through every stage, channels and size from the images."""
    root = tmp_path / "imgs"
    for split, count in (("train", 8), ("test", 4)):
        for label, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                shade = tuple(max(0, c - 5 * index) for c in color)
                Image.new("RGB", (10, 10), shade).save(root / split / label / f"{index}.png")
    teacher, store, pupil = tmp_path / "t", tmp_path / "c.zarr", tmp_path / "s"
    trained = invoke("train-teacher --model kd_cnn --epochs 2 --data", root, "--out", teacher)
    assert trained.exit_code == 0, trained.output
    assert read_card(teacher).data_config["input_size"] == [3, 10, 10]
    cached = invoke(
        "cache-teacher --temperature 3 --teacher", teacher, "--data", root, "--out", store
    )
    assert cached.exit_code == 0, cached.output
    assert manifest_of(store)["dataset"]["fingerprint"]["classes"] == ["blue", "red"]
    distilled = invoke(
        "train-student --model kd_mlp_30x2 --alpha 0.5 --epochs 2 --data",
        root,
        "--cache",
        store,
        "--out",
        pupil,
    )
    assert distilled.exit_code == 0, distilled.output
    evaluated = invoke("evaluate", pupil, "--format json --data", root, "--teacher", teacher)
    assert json.loads(evaluated.output)[0]["samples"] == 8


def test_a_teacher_trained_with_dropout_and_jitter_can_be_cached(tmp_path: Path) -> None:
    teacher = tmp_path / "mlp"
    trained = invoke(
        "train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --dropout 0.5 --jitter 2",
        "--out",
        teacher,
    )
    assert trained.exit_code == 0, trained.output
    result = cache(teacher, tmp_path / "c.zarr")
    assert result.exit_code == 0, result.output
