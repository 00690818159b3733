"""What the Hinton experiments need: a validation split, early stopping, a bias chosen on
the validation rows, ensembles and temperatures in reports, and docs tables that agree
with the runs' own files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cache, invoke, student
from kdpipe.base.errors import DatasetError, ManifestError, UsageError
from kdpipe.data.datasets import load_dataset, validation_rows
from kdpipe.models.runs import load_model
from kdpipe.models.teacher import predict_logits
from kdpipe.tools.report import report, to_markdown
from kdpipe.train import TrainConfig, resume_training, train_student

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_validation_rows_are_one_fixed_split() -> None:
    rows = validation_rows(600, 0.2)
    assert len(rows) == 120 and np.array_equal(rows, np.sort(rows))
    assert np.array_equal(rows, validation_rows(600, 0.2))  # no seed: the same in every run
    assert len(np.unique(rows)) == 120 and rows.max() < 600
    with pytest.raises(DatasetError, match=r"--val-fraction must be in \(0, 1\), not 1.0"):
        validation_rows(600, 1.0)
    with pytest.raises(DatasetError, match="holds out no rows"):
        validation_rows(3, 0.1)


@pytest.fixture(scope="module")
def stopped(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("es") / "run"
    options = "--alpha 1 --epochs 12 --lr 0.3 --val-fraction 0.25 --early-stopping 2 --seed 3"
    result = student(train_cache, out, options)
    assert result.exit_code == 0, result.output
    return out


def test_early_stopping_keeps_the_best_validation_epoch(stopped: Path) -> None:
    card = json.loads((stopped / "model.json").read_text())
    metrics = pd.read_csv(stopped / "metrics.csv")
    scored = metrics.dropna(subset=["val_errors"])
    best = int(scored.loc[scored["val_errors"].idxmin(), "epoch"])  # first minimum
    selection = card["selection"]
    assert selection["kept_epoch"] == best
    assert selection["epochs_run"] == int(metrics["epoch"].iloc[-1])
    assert selection["stopped_early"] and selection["epochs_run"] < 12
    after = scored[scored["epoch"] > best]["val_errors"]
    assert len(after) == 2 and (after >= scored["val_errors"].min()).all()
    # the saved weights are the kept epoch's: they score its test errors again
    model, loaded = load_model(stopped)
    test = load_dataset("synthetic", "test")
    logits = predict_logits(model, test.images, loaded.data, device=torch.device("cpu"))
    errors = int((logits.argmax(-1) != test.labels).sum())
    assert errors == int(metrics.set_index("epoch").loc[best, "test_errors"])
    # the validation rows were never trained on
    held_out = len(validation_rows(600, 0.25))
    assert card["dataset"]["rows"] == 600 - held_out
    assert card["dataset"]["validation_rows"] == held_out
    assert not (stopped / "best.safetensors").exists()


def test_early_stopping_resumes_to_the_same_weights(train_cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        model="kd_mlp_30x2", data="synthetic", out=str(tmp_path / "a"), epochs=8, lr=0.3,
        cache=str(train_cache), alpha=1.0, val_fraction=0.25, early_stopping=3, seed=3,
    )  # fmt: skip
    reference = train_student(config)

    class Killed(Exception):
        pass

    def kill_after_epoch_3(line: str) -> None:
        if line.startswith("epoch 3/"):
            raise Killed  # after epoch 3's checkpoint and best weights are on disk

    interrupted = TrainConfig(**{**config.__dict__, "out": str(tmp_path / "b")})
    with pytest.raises(Killed):
        train_student(interrupted, log=kill_after_epoch_3)
    assert (tmp_path / "b" / "checkpoint.json").exists()
    resumed = resume_training(tmp_path / "b")
    assert resumed.weights_sha256 == reference.weights_sha256
    assert resumed.selection == reference.selection


def test_validation_errors(train_cache: Path, tmp_path: Path) -> None:
    result = student(train_cache, tmp_path / "r", "--alpha 1 --early-stopping 2")
    assert result.exit_code != 0
    assert "--early-stopping watches the validation rows: give --val-fraction too" in result.output
    assert not (tmp_path / "r").exists()
    result = student(train_cache, tmp_path / "r", "--alpha 1 --val-fraction 1")
    assert result.exit_code != 0 and "--val-fraction" in result.output


@pytest.fixture(scope="module")
def omitted(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omit")
    store = root / "no2.zarr"
    assert cache(teacher_run, store, "--temperature 4 --exclude-classes 2").exit_code == 0
    out = root / "omit2-s0"
    result = student(store, out, "--alpha 0.1 --epochs 6 --lr 0.2 --val-fraction 0.3")
    assert result.exit_code == 0, result.output
    return out


def test_tune_bias_chooses_on_validation_rows(omitted: Path) -> None:
    result = invoke("tune-bias", omitted, "--classes 2 --data synthetic --max-bias 5 --step 0.5")
    assert result.exit_code == 0, result.output
    chosen = json.loads((omitted / "bias.json").read_text())
    # recompute independently: every grid value on the held-out rows, fewest errors,
    # then the smallest |bias|
    model, card = load_model(omitted)
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    rows = validation_rows(len(train), 0.3)
    logits = predict_logits(model, train.images[rows], card.data, device=torch.device("cpu"))
    labels = train.labels[rows].numpy()
    grid = np.arange(-10, 11) * 0.5
    errors = []
    for b in grid:
        shifted = logits.numpy().copy()
        shifted[:, 2] += b
        errors.append(int((shifted.argmax(1) != labels).sum()))
    best = min(range(len(grid)), key=lambda i: (errors[i], abs(grid[i])))
    assert chosen["bias"] == pytest.approx(grid[best])
    assert chosen["validation"]["after"]["errors"] == errors[best]
    test_logits = predict_logits(model, test.images, card.data, device=torch.device("cpu")).numpy()
    test_logits[:, 2] += grid[best]
    predicted = test_logits.argmax(1)
    threes = test.labels.numpy() == 2
    assert chosen["test"]["after"]["errors"] == int((predicted != test.labels.numpy()).sum())
    assert chosen["test"]["after"]["class_accuracy"] == pytest.approx(
        float((predicted[threes] == 2).mean()), abs=1e-6
    )
    assert f"bias {grid[best]:+g} for class(es) c" in result.output


def test_tune_bias_errors(omitted: Path, stopped: Path, teacher_run: Path) -> None:
    result = invoke("tune-bias", teacher_run, "--classes 2 --data synthetic")
    assert result.exit_code != 0
    assert "trained on every training row" in result.output
    assert "train it with --val-fraction F" in result.output
    result = invoke("tune-bias", omitted, "--classes 7 --data synthetic")
    assert result.exit_code != 0 and "--classes 7" in result.output
    assert "has classes 0..4" in result.output
    result = invoke("tune-bias", omitted, "--classes x --data synthetic")
    assert result.exit_code != 0 and "not a comma-separated list of class ids" in result.output


def test_report_of_an_ensemble_bias_and_temperatures(
    train_cache: Path, teacher_run: Path, omitted: Path, stopped: Path, tmp_path: Path
) -> None:
    members = []
    for seed in (0, 1):
        out = tmp_path / f"member-s{seed}"
        assert student(train_cache, out, f"--alpha 1 --seed {seed}").exit_code == 0
        members.append(out)
    teachers = " ".join(f"--teacher {m}" for m in members)
    ensemble = tmp_path / "ensemble-test.zarr"
    result = invoke(f"cache-teacher --data synthetic --split test {teachers} --temperature 1 "
                    f"--out {ensemble}")  # fmt: skip
    assert result.exit_code == 0, result.output
    train_ensemble = tmp_path / "ensemble.zarr"
    result = invoke(f"cache-teacher --data synthetic {teachers} --temperature 4 "
                    f"--out {train_ensemble}")  # fmt: skip
    assert result.exit_code == 0, result.output
    swept = []
    for t in (1, 4):
        out = tmp_path / f"from-ensemble-T{t}-s0"
        assert student(train_ensemble, out, f"--alpha 0.1 --temperature {t}").exit_code == 0
        swept.append(out)
    assert invoke("tune-bias", omitted, "--classes 2 --data synthetic").exit_code == 0
    markdown, plot = tmp_path / "results.md", tmp_path / "figures" / "t.png"
    runs = [*members, ensemble, *swept, omitted, stopped]
    table = report(runs, baseline="member", csv_path=tmp_path / "r.csv", markdown_path=markdown,
                   plot_path=plot).set_index("group")  # fmt: skip
    # the ensemble row is its test cache's measurement
    test = load_dataset("synthetic", "test")
    probs = []
    for member in members:
        model, card = load_model(member)
        logits = predict_logits(model, test.images, card.data, device=torch.device("cpu"))
        probs.append(torch.softmax(logits, -1))
    mean = torch.stack(probs).mean(0)
    expected = int((mean.argmax(-1) != test.labels).sum())
    assert table.loc["ensemble-test", "test_errors_mean"] == expected
    assert table.loc["ensemble-test", "kind"] == "ensemble"
    # a student of the ensemble recovers a share of the ensemble's gain over one member
    single = table.loc["member", "test_errors_mean"]
    student_errors = table.loc["from-ensemble-T4", "test_errors_mean"]
    if expected < single:
        assert table.loc["from-ensemble-T4", "gap_recovered"] == pytest.approx(
            (single - student_errors) / (single - expected)
        )
    bias = json.loads((omitted / "bias.json").read_text())
    assert table.loc["omit2", "bias_mean"] == bias["bias"]
    assert table.loc["omit2", "test_errors_after_bias"] == bias["test"]["after"]["errors"]
    kept = json.loads((stopped / "model.json").read_text())["selection"]["kept_epoch"]
    assert table.loc["run", "epochs"] == f"kept {kept}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "![test errors against the temperature T](figures/t.png)" in text
    assert "--split test --temperature 1 --combine mean-probs" in text  # the ensemble's command


def test_a_training_split_cache_is_not_a_report_row(train_cache: Path) -> None:
    with pytest.raises(UsageError, match="a cache of every plain image of a labelled test split"):
        report([train_cache])


SECTION = re.compile(r"<!-- kdpipe:(?P<name>[\w-]+):begin -->(?P<body>.*?)<!-- kdpipe:", re.S)


@pytest.mark.parametrize(
    "section",
    ["hinton", "hinton-temperature", "hinton-3pct", "hinton-omitted", "hinton-ensemble",
     "consistency"],
)  # fmt: skip
def test_committed_tables_agree_with_the_runs_files(section: str) -> None:
    """Each results.md table is generated from its runs: its errors column is the mean and
    std, per group, of the per-run CSV that the same report call wrote (not typed in)."""
    runs = pd.read_csv(DOCS / "results" / f"{section}.csv")
    sections = {m["name"]: m["body"] for m in SECTION.finditer((DOCS / "results.md").read_text())}
    lines = [line for line in sections[section].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    shown = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        shown[cells["group"]] = cells["test errors (of 10,000)"]
    assert set(shown) == set(runs["group"])
    for group, errors in runs.groupby("group")["test_errors"]:
        text = f"{errors.mean():.1f} ± {errors.std(ddof=1):.1f}" if len(errors) > 1 else (
            f"{errors.mean():.0f}")  # fmt: skip
        assert shown[group] == text, group


def test_a_run_started_before_the_validation_options_still_resumes(
    train_cache: Path, tmp_path: Path
) -> None:
    config = TrainConfig(model="kd_mlp_30x2", data="synthetic", out=str(tmp_path / "r"),
                         epochs=3, cache=str(train_cache), alpha=0.5)  # fmt: skip

    class Killed(Exception):
        pass

    def kill_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Killed

    with pytest.raises(Killed):
        train_student(config, log=kill_after_epoch_1)
    saved_path = tmp_path / "r" / "config.json"
    saved = json.loads(saved_path.read_text())
    del saved["val_fraction"], saved["early_stopping"]  # as an older kdpipe wrote it
    saved_path.write_text(json.dumps(saved))
    assert resume_training(tmp_path / "r").selection is None
    # a field kdpipe does not know is still refused
    with pytest.raises(Killed):
        train_student(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "s")}),
                      log=kill_after_epoch_1)  # fmt: skip
    saved_path = tmp_path / "s" / "config.json"
    saved_path.write_text(json.dumps({**json.loads(saved_path.read_text()), "bogus": 1}))
    with pytest.raises(ManifestError, match="is not a kdpipe training configuration"):
        resume_training(tmp_path / "s")


def test_students_that_saw_the_class_are_a_measured_row(
    omitted: Path, train_cache: Path, tmp_path: Path
) -> None:
    invoke("tune-bias", omitted, "--classes 2 --data synthetic --max-bias 5 --step 0.5")
    seen = tmp_path / "seen-s0"
    assert student(train_cache, seen, "--alpha 0.1 --epochs 2").exit_code == 0
    evaluation = tmp_path / "seen.csv"
    result = invoke(
        "evaluate", seen, f"--data synthetic --per-class --format csv --output {evaluation}"
    )
    assert result.exit_code == 0, result.output
    table = report([omitted, seen], evaluations=[evaluation])
    row = table[table["group"] == "seen"].iloc[0]
    # recomputed independently: the share of test samples of class 2 predicted as 2
    model, card = load_model(seen)
    test = load_dataset("synthetic", "test")
    predicted = predict_logits(model, test.images, card.data, device=torch.device("cpu")).argmax(1)
    twos = test.labels == 2
    assert row["class_accuracy_before"] == pytest.approx(
        float((predicted[twos] == 2).float().mean()), abs=1e-6
    )
    assert pd.isna(row["bias_mean"]) and pd.isna(row["class_accuracy_after"])
    markdown = to_markdown(table)
    seen_line = next(line for line in markdown.splitlines() if line.startswith("| seen "))
    assert f"{row['class_accuracy_before']:.1%}" in seen_line
    with pytest.raises(UsageError, match="--class-accuracy needs a run with a tune-bias result"):
        report([seen], evaluations=[evaluation])
    bare = tmp_path / "bare.csv"
    assert invoke("evaluate", seen, f"--data synthetic --format csv --output {bare}").exit_code == 0
    with pytest.raises(
        UsageError,
        match=r"lack class_2_accuracy: write them with `kdpipe evaluate RUN --per-class`",
    ):
        report([omitted, seen], evaluations=[bare])
