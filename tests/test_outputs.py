"""The one output guard (issue 24, "nothing lost"): an output is replaced only with
--overwrite, --overwrite replaces only what kdpipe wrote, and never a folder that holds the
working directory, an input or the data; everything else is one line, nothing touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cache, fails, invoke, snapshot
from kdpipe.base import outputs
from kdpipe.cache.location import Location

TEACHER = "train-teacher --model kd_cnn_tiny --data synthetic --epochs 1 --out"


@pytest.fixture
def nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory a/sub, with files above and in it that nothing may touch."""
    work = tmp_path / "a" / "sub"
    work.mkdir(parents=True)
    (tmp_path / "a" / "thesis.tex").write_text("chapter one\n")
    (work / "notes.txt").write_text("keep me\n")
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("out", ["..", "../", "../../a", ".", "./"])
def test_overwrite_never_removes_the_working_directory_or_its_parents(
    nested: Path, out: str
) -> None:
    before = snapshot(nested)
    fails(invoke(TEACHER, out, "--overwrite"), "the working directory")
    assert snapshot(nested) == before and Path.cwd().is_dir()


@pytest.mark.parametrize("out", ["..", "."])
def test_cache_teacher_never_removes_the_working_directory(
    nested: Path, teacher_run: Path, out: str
) -> None:
    before = snapshot(nested)
    fails(cache(teacher_run, out, "--temperature 2 --overwrite"), "the working directory")
    assert snapshot(nested) == before


def test_a_symlink_to_an_ancestor_is_refused_too(nested: Path) -> None:
    (Path.cwd() / "up").symlink_to(nested / "a", target_is_directory=True)
    before = snapshot(nested)
    fails(invoke(TEACHER, "up", "--overwrite"), "holds the working directory")
    assert snapshot(nested) == before


def test_overwrite_never_replaces_a_folder_kdpipe_did_not_write(tmp_path: Path) -> None:
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work\n")
    fails(invoke(TEACHER, thesis, "--overwrite"), "is not a run directory kdpipe wrote")
    assert (thesis / "chapter1.tex").read_text() == "years of work\n"


def test_overwrite_never_replaces_a_cache_with_a_run(train_cache: Path, tmp_path: Path) -> None:
    before = snapshot(train_cache)
    fails(invoke(TEACHER, train_cache, "--overwrite"), "is not a run directory kdpipe wrote")
    assert snapshot(train_cache) == before


def test_overwrite_never_replaces_a_run_with_a_cache(teacher_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke(TEACHER, run).exit_code == 0
    before = snapshot(run)
    fails(cache(teacher_run, run, "--temperature 2 --overwrite"), "is not a cache kdpipe wrote")
    assert snapshot(run) == before


def test_overwrite_replaces_what_kdpipe_wrote(teacher_run: Path, tmp_path: Path) -> None:
    run, store = tmp_path / "run", tmp_path / "c.zarr"
    assert invoke(TEACHER, run).exit_code == 0
    (run / "stale").write_text("from the earlier run\n")
    assert invoke(TEACHER, run, "--overwrite").exit_code == 0
    assert not (run / "stale").exists() and (run / "model.json").is_file()
    assert cache(teacher_run, store).exit_code == 0
    assert cache(teacher_run, store, "--temperature 3 --overwrite").exit_code == 0
    meta = json.loads((store / "zarr.json").read_text())
    assert "T=3" in json.dumps(meta) or '"temperature": 3' in json.dumps(meta)


def test_a_symlinked_run_is_replaced_as_a_link_only(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    assert invoke(TEACHER, real).exit_code == 0
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(real)
    assert invoke(TEACHER, link, "--overwrite").exit_code == 0
    assert snapshot(real) == before  # the link's target is kept
    assert not link.is_symlink() and (link / "model.json").is_file()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "teacher-s0"
    result = invoke("train-teacher --model kd_cnn_tiny --data synthetic --epochs 2 --out", run)
    assert result.exit_code == 0, result.output
    return run


def test_evaluate_output_needs_overwrite(finished_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "eval.csv"
    output.write_text("someone's numbers\n")
    evaluate = f"evaluate {finished_run} --data synthetic --format csv --output"
    fails(invoke(evaluate, output), "already exists: choose another path or pass --overwrite")
    fails(invoke(evaluate, output, "--overwrite"), "is not a kdpipe evaluate report")
    assert output.read_text() == "someone's numbers\n"
    output.unlink()
    assert invoke(evaluate, output).exit_code == 0
    assert invoke(evaluate, output, "--overwrite").exit_code == 0  # its own: replaced
    assert output.read_text().startswith("run,")


def test_evaluate_output_never_replaces_a_cache_manifest(
    finished_run: Path, train_cache: Path
) -> None:
    before = snapshot(train_cache)
    output = train_cache / "zarr.json"
    evaluate = f"evaluate {finished_run} --data synthetic --output"
    fails(invoke(evaluate, output), "already exists")
    fails(invoke(evaluate, output, "--overwrite"), "is not a kdpipe evaluate report")
    assert snapshot(train_cache) == before


def test_report_csv_needs_overwrite(finished_run: Path, tmp_path: Path) -> None:
    table = tmp_path / "results.csv"
    table.write_text("a,b\n1,2\n")
    fails(invoke("report", finished_run, "--csv", table), "pass --overwrite")
    fails(invoke("report", finished_run, "--csv", table, "--overwrite"),
          "is not a CSV table of kdpipe report")  # fmt: skip
    assert table.read_text() == "a,b\n1,2\n"
    table.unlink()
    assert invoke("report", finished_run, "--csv", table).exit_code == 0
    assert invoke("report", finished_run, "--csv", table, "--overwrite").exit_code == 0


def test_report_markdown_edits_only_a_markdown_file(
    finished_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    before = snapshot(train_cache)
    fails(invoke("report", finished_run, "--markdown", train_cache / "zarr.json"),
          "is not a Markdown file")  # fmt: skip
    assert snapshot(train_cache) == before
    page = tmp_path / "page.md"
    page.write_text("# Results\n\nwritten by hand\n")
    assert invoke("report", finished_run, "--markdown", page).exit_code == 0
    assert page.read_text().startswith("# Results\n\nwritten by hand\n")


def test_report_plot_never_replaces_a_foreign_png(finished_run: Path, tmp_path: Path) -> None:
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    fails(invoke("report", finished_run, "--plot", picture, "--overwrite"),
          "is not a PNG drawn by kdpipe")  # fmt: skip
    assert picture.read_bytes() == b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    drawn = tmp_path / "curves.png"
    assert invoke("report", finished_run, "--plot", drawn).exit_code == 0
    fails(invoke("report", finished_run, "--plot", drawn), "pass --overwrite")
    assert invoke("report", finished_run, "--plot", drawn, "--overwrite").exit_code == 0


def test_storage_csv_needs_overwrite(train_cache: Path, tmp_path: Path) -> None:
    table = tmp_path / "storage.csv"
    table.write_text("mine\n")
    fails(invoke("storage", train_cache, "--top-k 1,2 --csv", table), "pass --overwrite")
    fails(invoke("storage", train_cache, "--top-k 1,2 --csv", table, "--overwrite"),
          "is not a CSV table of kdpipe storage")  # fmt: skip
    assert table.read_text() == "mine\n"


def test_report_counts_one_run_once(finished_run: Path, tmp_path: Path) -> None:
    from kdpipe.tools.report import report

    spelled = finished_run.parent / "." / finished_run.name
    table = report([finished_run, Path(str(spelled) + "/")])
    assert list(table["seeds"]) == ["0"]
    link = tmp_path / "teacher-s0"
    link.symlink_to(finished_run, target_is_directory=True)
    assert list(report([finished_run, link])["seeds"]) == ["0"]


def test_report_reads_the_final_result_from_model_json(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    from kdpipe.tools.report import report

    run = tmp_path / "teacher-s0"
    shutil.copytree(finished_run, run)
    full = report([run]).iloc[0]
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:-1]))  # epoch 2's row lost
    lost = report([run]).iloc[0]
    assert lost["test_errors_mean"] == full["test_errors_mean"] and lost["epochs"] == "2"
    assert "metrics.csv lacks epoch 2" in lost["note"]
    (run / "metrics.csv").write_text("")
    fails(invoke("report", run), "is empty")
    (run / "metrics.csv").write_text(lines[0][:7])
    fails(invoke("report", run), "metrics.csv lacks the column(s)")


def test_report_plot_must_be_a_png(finished_run: Path, tmp_path: Path) -> None:
    fails(invoke("report", finished_run, "--plot", tmp_path / "out.md"), "ending in .png")
    assert not (tmp_path / "out.md").exists()
    fails(invoke("report", finished_run, "--temperature-plot", tmp_path / "t.pdf"), ".png")


def test_disk_full_names_the_file(finished_run: Path, tmp_path: Path) -> None:
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)],
                             capture_output=True).returncode == 0  # fmt: skip
    if not mounted:
        pytest.skip("needs root to mount a 16 KiB tmpfs (the disk that fills up)")
    try:
        (full / "filler").write_bytes(b"\0" * 16384)
        fails(invoke("report", finished_run, "--csv", full / "r.csv"), f"{full / 'r.csv'}")
        fails(invoke(TEACHER, full / "run"), f"{full / 'run'}")
    finally:
        subprocess.run(["umount", str(full)], check=True)


DOCS = Path(__file__).resolve().parent.parent / "docs"
# what the Makefile's report targets write over with --overwrite: a fresh clone's make all
# refuses to replace any of them that kdpipe's guard does not know as its own
SHIPPED = {"results/*.png": outputs.PNG, "results/hinton*.csv": outputs.REPORT_CSV,
           "results/beyond.csv": outputs.REPORT_CSV, "results/consistency.csv": outputs.REPORT_CSV,
           "results/storage.csv": outputs.STORAGE_CSV, "results/bench-*.csv": outputs.BENCH_CSV,
           "results.md": outputs.MARKDOWN}  # fmt: skip


@pytest.mark.parametrize("pattern", sorted(SHIPPED))
def test_the_outputs_docs_ship_are_known_as_kdpipes_own(pattern: str) -> None:
    shipped = sorted(DOCS.glob(pattern))
    assert shipped, f"docs has no {pattern}"
    strangers = [p.name for p in shipped if not SHIPPED[pattern].ours(Location(p))]
    assert strangers == [], f"make all could not --overwrite {strangers}"
