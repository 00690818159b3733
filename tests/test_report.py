"""Result tables come from the runs' own files, and docs sections are replaced in place."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import student
from kdpipe.base.errors import UsageError
from kdpipe.tools.publish import replace_section
from kdpipe.tools.report import command_line, report


@pytest.fixture(scope="module")
def runs(teacher_run: Path, train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for group, alpha in (("hard", "1"), ("kd", "0.3")):
        for seed in ("0", "1"):
            out = root / f"{group}-s{seed}"
            result = student(train_cache, out, f"--alpha {alpha} --seed {seed} --epochs 1")
            assert result.exit_code == 0, result.output
            dirs.append(out)
    return [teacher_run, *dirs]


def test_table_is_read_from_the_runs(runs: list, tmp_path: Path) -> None:
    markdown = tmp_path / "results.md"
    markdown.write_text("# Results\n\nWritten by a person.\n")
    table = report(runs, baseline="hard", csv_path=tmp_path / "runs.csv", markdown_path=markdown)
    assert list(table["group"]) == ["run", "hard", "kd"]
    per_run = pd.read_csv(tmp_path / "runs.csv")
    errors = {
        r: pd.read_csv(Path(d) / "metrics.csv")["test_errors"].iloc[-1]
        for r, d in zip(per_run["run"], runs, strict=True)
    }
    assert dict(zip(per_run["run"], per_run["test_errors"], strict=True)) == errors
    hard = table.set_index("group").loc["hard"]
    assert hard["test_errors_mean"] == (errors["hard-s0"] + errors["hard-s1"]) / 2
    kd = table.set_index("group").loc["kd"]
    teacher = errors["run"]
    if hard["test_errors_mean"] > teacher:
        expected = (hard["test_errors_mean"] - kd["test_errors_mean"]) / (
            hard["test_errors_mean"] - teacher
        )
        assert kd["gap_recovered"] == pytest.approx(expected)
    text = markdown.read_text()
    assert text.startswith("# Results\n\nWritten by a person.\n")
    assert "kdpipe train-student --model kd_mlp_30x2 --data synthetic" in text
    assert "--seed SEED" in text
    assert "--alpha 1.0 " in text or text.count("--alpha 1.0\n") == 1  # the baseline says so
    assert "kdpipe cache-teacher --teacher" in text and "--split train --temperature 4" in text

    # edit one run's metrics: the result stays the one the run recorded as final (model.json)
    # and the table says that metrics.csv disagrees (issue 24)
    metrics = pd.read_csv(runs[1] / "metrics.csv")
    metrics.loc[metrics.index[-1], "test_errors"] = 123
    metrics.to_csv(runs[1] / "metrics.csv", index=False)
    again = report(runs, baseline="hard", markdown_path=markdown)
    hard_again = again.set_index("group").loc["hard"]
    assert hard_again["test_errors_mean"] == hard["test_errors_mean"]
    assert "metrics.csv disagrees with model.json" in hard_again["note"]
    assert markdown.read_text().count("<!-- kdpipe:results:begin -->") == 1


def test_gap_recovery_needs_a_teacher_better_than_the_baseline(runs: list) -> None:
    from kdpipe.tools.report import collect, summarize

    per_run = collect(runs)
    assert per_run.set_index("group").loc["hard", "teacher"].tolist() == ["", ""]  # alpha = 1
    assert set(per_run.set_index("group").loc["kd", "teacher"]) == {"run"}
    baseline = per_run[per_run["group"] == "hard"]["test_errors"].mean()
    per_run.loc[per_run["run"] == "run", "test_errors"] = int(baseline) + 5  # a worse teacher
    table = summarize(per_run, "hard").set_index("group")
    assert table.loc["kd", "gap_recovered"] is None or pd.isna(table.loc["kd", "gap_recovered"])


def test_unknown_baseline(runs: list) -> None:
    with pytest.raises(UsageError, match="--baseline 'nope' is not one of the groups"):
        report(runs, baseline="nope")


def test_replace_section_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    path.write_text("before\n<!-- kdpipe:x:begin -->\nold\n<!-- kdpipe:x:end -->\nafter\n")
    replace_section(path, "x", "new")
    expected = "before\n<!-- kdpipe:x:begin -->\nnew\n<!-- kdpipe:x:end -->\nafter\n"
    assert path.read_text() == expected


def test_command_line_shows_only_what_differs_from_defaults() -> None:
    config = {"kind": "student", "model": "kd_cnn", "data": "synthetic", "out": "o", "epochs": 3}
    config |= {"alpha": 0.1, "lr": 0.05, "drop_rate": 0.5, "hidden_sizes": [8, 4]}
    line = command_line({**config, "overwrite": True, "sched_on": "update", "resize": None})
    assert line == (
        "kdpipe train-student --model kd_cnn --data synthetic --out o --epochs 3 "
        "--dropout 0.5 --hidden-sizes 8,4 --alpha 0.1"
    )
    # a config.json from before --sched-on was made per epoch, and its command says so
    assert command_line(config) == line.replace(
        "--epochs 3", "--epochs 3 --resize squash --sched-on epoch"
    )
    # one line for every seed of a chain: each seed's link is its own cache, the same seed's
    chain = {"kind": "student", "model": "kd_cnn", "data": "synthetic", "out": "r/b-s1",
             "epochs": 3, "alpha": 0.1, "seed": 1, "cache": "r/a-s1.zarr",
             "sched_on": "update", "resize": None}  # fmt: skip
    assert command_line(chain, seed_placeholder=True) == (
        "kdpipe train-student --model kd_cnn --data synthetic --out r/b-sSEED --epochs 3 "
        "--seed SEED --cache r/a-sSEED.zarr --alpha 0.1"
    )
    shared = command_line({**chain, "cache": "r/logits-s10.zarr"}, seed_placeholder=True)
    assert "--cache r/logits-s10.zarr" in shared  # another seed's, or no seed's: as it is


def test_views_caches_and_online_runs_are_reported_with_their_commands(
    teacher_run: Path, tmp_path: Path
) -> None:
    from conftest import cache, invoke

    store = tmp_path / "views.zarr"
    options = "--temperature 2 --views 2 --augment flip --mix cutmix --subset 0.5 --seed 3"
    assert cache(teacher_run, store, options).exit_code == 0
    cached = tmp_path / "views-s0"
    assert student(store, cached, "--alpha 0.5 --epochs 1").exit_code == 0
    online = tmp_path / "online-s0"
    result = invoke("distill-online --model kd_mlp_30x2 --data synthetic --epochs 1 --teacher",
                    teacher_run, "--alpha 0.5 --temperature 2 --augment flip --subset 0.5 "
                    "--out", online)  # fmt: skip
    assert result.exit_code == 0, result.output
    markdown = tmp_path / "r.md"
    table = report([cached, online], markdown_path=markdown)
    sources = dict(zip(table["group"], table["soft_labels"], strict=True))
    assert sources == {
        "views": "cache, 2 flip + cutmix views",
        "online": "online, fresh flip views",
    }
    text = markdown.read_text()
    assert (
        f"kdpipe cache-teacher --teacher {teacher_run} --data synthetic --split train "
        f"--temperature 2 --views 2 --augment flip --mix cutmix --mix-alpha 1 --subset 0.5 "
        f"--seed 3 --out {store}"
    ) in text
    assert "kdpipe distill-online --model kd_mlp_30x2 --data synthetic" in text
    assert "--subset 0.5" in text and f"--teacher {teacher_run}" in text
    assert "Teacher passes (paid once per cache, not in the minutes above): `views.zarr`" in text


def _write_sections(path: Path, name: str, rounds: int) -> None:
    for i in range(rounds):
        replace_section(path, name, f"{name} round {i}")


def test_reports_writing_one_file_at_once_keep_every_section(tmp_path: Path) -> None:
    """make -j2 runs two reports into results.md together: neither may erase the other's."""
    import multiprocessing

    path = tmp_path / "results.md"
    path.write_text("# Results\n")
    context = multiprocessing.get_context("fork")
    names = [f"s{i}" for i in range(4)]
    workers = [context.Process(target=_write_sections, args=(path, n, 40)) for n in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    text = path.read_text()
    assert text.startswith("# Results\n")
    for name in names:
        assert text.count(f"<!-- kdpipe:{name}:begin -->") == 1
        assert f"{name} round 39" in text
