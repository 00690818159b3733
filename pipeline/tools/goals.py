"""The summary at the top of ``docs/results.md``: each Hinton et al. (2015) experiment as
the paper's figure, kdpipe's figure, their ratio and the goal it is held to.

Reads only the per-run CSVs that ``kdpipe report`` wrote for ``make all`` (one row per
run: ``group``, ``seed``, ``test_errors``, ...), so the summary is as reproducible as the
tables it summarises. Every share is computed from the seeds' means, and each goal also
shows its per-seed paired figures (a student against the baseline of the same seed).
Run as ``python -m kdpipe.tools.goals RESULTS_DIR --csv OUT --markdown FILE``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from kdpipe.base.errors import UsageError
from kdpipe.tools.publish import publish


@dataclass(frozen=True)
class Goal:
    """One experiment's figure: ``measure`` turns its CSV's rows into (share, per-seed
    paired values); the paper's share and the goal's threshold are fixed fractions."""

    experiment: str
    csv: str
    figure: str
    paper: float
    paper_words: str
    goal: float
    measure: Callable[[pd.DataFrame], tuple[float, list[str]]]


def _group(rows: pd.DataFrame, name: str, csv: str) -> pd.DataFrame:
    group = rows[rows["group"] == name]
    if group.empty:
        raise UsageError(f"{csv} has no runs of group {name!r} (groups: "
                         + ", ".join(dict.fromkeys(rows["group"])) + ")")  # fmt: skip
    return group


def _by_seed(group: pd.DataFrame, column: str = "test_errors") -> pd.Series:
    return group.set_index("seed")[column].astype(float)


def gap_share(
    baseline: str, student: str, reference: str, csv: str
) -> Callable[[pd.DataFrame], tuple[float, list[str]]]:
    """Hinton's share of a gap: (baseline − student) / (baseline − reference), in test
    errors, from the groups' means; per seed, baseline − student of the same seed."""

    def measure(rows: pd.DataFrame) -> tuple[float, list[str]]:
        base = _by_seed(_group(rows, baseline, csv))
        ours = _by_seed(_group(rows, student, csv))
        far = float(_group(rows, reference, csv)["test_errors"].mean())
        paired = [
            f"s{int(seed)}: {base[seed] - ours[seed]:+.0f}"
            for seed in sorted(set(base.index) & set(ours.index))
        ]
        if base.mean() <= far:  # no gap to close: the share is undefined, not a number
            return math.nan, [*paired, f"{reference} ({far:g}) is no better than {baseline}"]
        return (base.mean() - ours.mean()) / (base.mean() - far), paired

    return measure


def class_share(group_name: str, csv: str) -> Callable[[pd.DataFrame], tuple[float, list[str]]]:
    """The omitted class's share right after the bias, mean over seeds, and per seed."""

    def measure(rows: pd.DataFrame) -> tuple[float, list[str]]:
        after = _by_seed(_group(rows, group_name, csv), "class_accuracy_after")
        return float(after.mean()), [f"s{int(s)}: {v:.1%}" for s, v in after.sort_index().items()]

    return measure


def baseline_errors(group_name: str, csv: str) -> Callable[[pd.DataFrame], tuple[float, list[str]]]:
    """A group's mean test errors (a goal stated in errors, not as a share)."""

    def measure(rows: pd.DataFrame) -> tuple[float, list[str]]:
        errors = _by_seed(_group(rows, group_name, csv))
        return float(errors.mean()), [f"s{int(s)}: {v:.0f}" for s, v in errors.sort_index().items()]

    return measure


# The paper's figures are REFERENCE.md's: MNIST (146 - 74) / (146 - 67); speech ensemble
# (60.8 - 58.9) / (61.1 - 58.9); speech 3 % (57.0 - 44.5) / (58.9 - 44.5); 98.6 % of 3s.
GOALS = (
    Goal("1. MNIST table: hard-label 800-800 baseline", "hinton.csv", "test errors",
         146, "146 errors on MNIST (not comparable: another dataset)", 950,
         baseline_errors("student-hard", "hinton.csv")),
    Goal("1. MNIST table: distilled from the CNN teacher", "hinton.csv",
         "share of the gap to the teacher recovered", 72 / 79, "91 % (146 → 74, teacher 67)",
         1 / 3, gap_share("student-hard", "student-from-cnn", "teacher-cnn", "hinton.csv")),
    Goal("3. 3 % of the data: soft targets on stored crops against hard labels", "hinton-3pct.csv",
         "share of the gap to the all-data student closed", 12.5 / 14.4,
         "87 % (44.5 → 57.0 %, all data 58.9 %)", 1 / 2,
         gap_share("pct3-hard", "pct3-soft-views", "student-hard", "hinton-3pct.csv")),
    Goal("4. Omitted class, after the bias", "hinton-omitted.csv",
         "share of the omitted class right", 996 / 1010, "98.6 % of the 3s", 0.95,
         class_share("omit3", "hinton-omitted.csv")),
    Goal("5. Ensemble: distilled from the ensemble", "hinton-ensemble.csv",
         "share of the ensemble's gain over one member kept", 1.9 / 2.2,
         "86 % (58.9 → 60.8 %, ensemble 61.1 %)", 1 / 2,
         gap_share("member", "student-from-ensemble", "ensemble-test", "hinton-ensemble.csv")),
)  # fmt: skip


def summary(results_dir: Path, goals: tuple[Goal, ...] = GOALS) -> pd.DataFrame:
    """One row per goal, from the per-run CSVs in ``results_dir``."""
    rows = []
    for goal in goals:
        path = results_dir / goal.csv
        if not path.is_file():
            raise UsageError(f"{path} does not exist: run `make all` (its tables write it)")
        value, paired = goal.measure(pd.read_csv(path))
        errors = goal.figure == "test errors"
        # no gap gives NaN: shown as undefined, and (NaN compares False) never reached
        rows.append(
            {
                "experiment": goal.experiment,
                "figure": goal.figure,
                "paper": goal.paper_words,
                "kdpipe": f"{value:.1f} errors" if errors else _share(value),
                "kdpipe ÷ paper": "—" if errors or math.isnan(value) else
                f"{value / goal.paper:.2f}",
                "goal": f"≤ {goal.goal:g} errors" if errors else f"≥ {goal.goal:.0%}",
                "reached": "yes" if (value <= goal.goal if errors else value >= goal.goal)
                else "no",
                "per seed (paired against the baseline's seed)": ", ".join(paired),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def _share(value: float) -> str:
    return "undefined (no gap)" if math.isnan(value) else f"{value:.0%}"


def _text(table: pd.DataFrame, results_dir: Path) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"Generated by `python -m kdpipe.tools.goals {results_dir}` on {when} from the per-run "
        "CSVs of the tables below (shares from the seeds' mean test errors).",
        "",
        table.to_markdown(index=False),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdpipe.tools.goals", description=__doc__)
    parser.add_argument("results_dir", type=Path, help="the folder of the per-run CSVs")
    parser.add_argument("--csv", type=Path, help="write the summary rows here")
    parser.add_argument("--markdown", type=Path, help="replace the section in this file")
    parser.add_argument("--section", default="summary")
    args = parser.parse_args(argv)
    try:
        table = summary(args.results_dir)
    except UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    publish(table, csv_path=args.csv, markdown_path=args.markdown, section=args.section,
            text=lambda: _text(table, args.results_dir))  # fmt: skip
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
