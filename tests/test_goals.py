"""The summary of the Hinton goals (kdpipe.tools.goals): its arithmetic on known rows, and
its messages when a table is missing or a group is absent."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kdpipe.base.errors import UsageError
from kdpipe.tools.goals import main, summary


def _rows(groups: dict[str, list[float]], column: str = "test_errors") -> pd.DataFrame:
    return pd.DataFrame(
        [{"group": g, "seed": s, column: v} for g, vs in groups.items() for s, v in enumerate(vs)]
    )


@pytest.fixture
def results(tmp_path: Path) -> Path:
    _rows(
        {"teacher-cnn": [700], "student-hard": [950, 960, 940], "student-from-cnn": [900, 930, 900]}
    ).to_csv(tmp_path / "hinton.csv", index=False)
    _rows(
        {
            "pct3-hard": [1800, 1810, 1790],
            "pct3-soft-views": [1400, 1400, 1400],
            "student-hard": [950, 960, 940],
        }
    ).to_csv(tmp_path / "hinton-3pct.csv", index=False)
    _rows({"omit3": [0.96, 0.94, 0.97]}, "class_accuracy_after").to_csv(
        tmp_path / "hinton-omitted.csv", index=False
    )
    _rows({"member": [1000, 1010, 990], "ensemble-test": [950],
           "student-from-ensemble": [980, 970, 990]}).to_csv(
        tmp_path / "hinton-ensemble.csv", index=False)  # fmt: skip
    return tmp_path


def test_shares_are_hinton_s_from_the_means_and_paired_by_seed(results: Path) -> None:
    table = summary(results).set_index("experiment")
    baseline = table.loc["1. MNIST table: hard-label 800-800 baseline"]
    assert baseline["kdpipe"] == "950.0 errors" and baseline["reached"] == "yes"
    mnist = table.loc["1. MNIST table: distilled from the CNN teacher"]
    # (950 - 910) / (950 - 700) = 16 %, paired: 950-900, 960-930, 940-900
    assert mnist["kdpipe"] == "16%" and mnist["reached"] == "no"
    assert mnist["kdpipe ÷ paper"] == f"{0.16 / (72 / 79):.2f}"
    assert mnist["per seed (paired against the baseline's seed)"] == "s0: +50, s1: +30, s2: +40"
    pct = table.loc["3. 3 % of the data: soft targets on stored crops against hard labels"]
    assert pct["kdpipe"] == f"{400 / 850:.0%}" and pct["reached"] == "no"  # 47 % < 50 %
    omit = table.loc["4. Omitted class, after the bias"]
    assert omit["kdpipe"] == "96%" and omit["reached"] == "yes"
    ensemble = table.loc["5. Ensemble: distilled from the ensemble"]
    assert ensemble["kdpipe"] == "40%" and ensemble["goal"] == "≥ 50%"  # (1000-980)/(1000-950)


def test_missing_tables_and_groups_are_named(results: Path, tmp_path: Path) -> None:
    (results / "hinton-3pct.csv").rename(results / "kept.csv")
    with pytest.raises(UsageError, match=r"hinton-3pct.csv does not exist: run `make all`"):
        summary(results)
    _rows({"student-hard": [950]}).to_csv(results / "hinton.csv", index=False)
    with pytest.raises(UsageError, match=r"hinton.csv has no runs of group 'student-from-cnn' "
                       r"\(groups: student-hard\)"):  # fmt: skip
        summary(results)
    (results / "kept.csv").rename(results / "hinton-3pct.csv")
    (results / "hinton.csv").write_text(_rows({"teacher-cnn": [990], "student-hard": [950],
        "student-from-cnn": [940]}).to_csv(index=False))  # fmt: skip
    row = summary(results).iloc[1]  # a 1-epoch smoke run may have no gap: no share, not met
    assert row["kdpipe"] == "undefined (no gap)" and row["reached"] == "no"
    assert "teacher-cnn (990) is no better than student-hard" in row.iloc[-1]


def test_the_summary_section_is_written(results: Path, capsys: pytest.CaptureFixture) -> None:
    page = results / "results.md"
    page.write_text("# Results\n\nkept text\n")
    main([str(results), "--markdown", str(page), "--csv", str(results / "summary.csv")])
    text = page.read_text()
    assert "kept text" in text and "<!-- kdpipe:summary:begin -->" in text
    assert "| 4. Omitted class, after the bias" in text
    assert len(pd.read_csv(results / "summary.csv")) == 5
    with pytest.raises(SystemExit) as stop:
        main([str(results / "nowhere")])
    assert stop.value.code == 2
    assert "nowhere/hinton.csv does not exist" in capsys.readouterr().err
