"""``make detect``'s tables, built only from what its runs, caches and evaluations wrote.

The folder ``make detect`` fills holds ``teacher/`` (a detection teacher run, from either
trainer: its own line, not a row), one cache per storage (``*.zarr``), student runs
(``model.json`` with ``"task": "detect"``) and ``eval/NAME.csv`` (``kdpipe evaluate
--format csv --output``, one per run, ``NAME.fp32.csv`` and ``NAME.int8.csv`` for its ONNX
files, ``NAME.one2one.csv`` for a YOLO26's NMS-free head: ``--head one2one``). Nothing is
measured here: a student's arm comes
from its ``config.json`` (a cache of which storage, a teacher run online, or hard labels),
its epoch time from its ``metrics.csv``, its mAP from its evaluation, a cache's bytes from
its files on disk and its teacher pass from its manifest (``created`` to ``completed``).

``python -m kdpipe.tasks.detect.results RUNS docs/results.md`` writes the tables and the
goals of issue 25 into the ``detect`` section of the page.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd


def cache_record(path: Path) -> dict:
    """A cache's storage, bytes per row and view on disk, and its teacher pass in seconds."""
    from kdpipe.cache import read_detection_manifest

    manifest = read_detection_manifest(path).to_dict()  # checked: its checksum, its fields
    files = [p for p in path.rglob("*") if p.is_file()]
    stored = sum(p.stat().st_size for p in files)
    started, done = manifest["created"], manifest["completed"]
    seconds = (datetime.fromisoformat(done) - datetime.fromisoformat(started)).total_seconds()
    storage = manifest["storage"]
    return {"cache": path.name, "storage": storage["kind"] if storage["kind"] == "dense"
            else f"top-{storage['k']}", "dtype": manifest["dtype"], "views": manifest["num_views"],
            "rows": manifest["num_samples"], "image_size": manifest["image_size"],
            "bytes_per_view": stored / (manifest["num_samples"] * manifest["num_views"]),
            "files": len(files),
            "teacher_pass_s": seconds, "kind": storage["kind"]}  # fmt: skip


def _map(folder: Path, name: str) -> float:
    path = folder / "eval" / f"{name}.csv"
    if not path.is_file():
        return float("nan")
    return float(pd.read_csv(path)["map50_95"].iloc[0])


def _splits(folder: Path) -> str:
    """The split(s) the folder's evaluations read, as their own files say (``make detect``
    evaluates on one: ``DETECT_SPLIT``)."""
    names = sorted({str(pd.read_csv(p)["split"].iloc[0]) for p in (folder / "eval").glob("*.csv")})
    return " and ".join(names) or "no"


TEACHER = "teacher"  # the folder's teacher run, by either trainer


def _arm(config: dict, caches: dict[str, dict]) -> str:
    if config.get("cache"):
        return f"cached-{caches[Path(config['cache']).name]['kind']}"
    return "online" if config.get("teacher") else "hard"


# each head's mAP column, and how a goal line names it
HEADS = {"map50_95": "", "map50_95_one2one": " through its one-to-one (NMS-free) head"}


def detection_tables(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per student run, per arm (mean over seeds) and per cache, from ``folder``'s files."""
    folder = Path(folder)
    caches = {p.name: cache_record(p) for p in sorted(folder.glob("*.zarr"))}
    rows = []
    for card_file in sorted(folder.glob("*/model.json")):
        card = json.loads(card_file.read_text())
        run = card_file.parent
        if card.get("task") != "detect" or card.get("kind") != "student" or run.name == TEACHER:
            continue  # the teacher (kdpipe's loop makes it a student-kind run) has its own line
        config = json.loads((run / "config.json").read_text())
        metrics = pd.read_csv(run / "metrics.csv")
        rows.append({"run": run.name, "architecture": card["architecture"],
                     "arm": _arm(config, caches), "seed": config["seed"],
                     "epochs": len(metrics), "epoch_s": float(metrics["seconds"].mean()),
                     "map50_95": _map(folder, run.name),
                     "map50_95_one2one": _map(folder, f"{run.name}.one2one"),
                     "onnx_fp32": _map(folder, f"{run.name}.fp32"),
                     "onnx_int8": _map(folder, f"{run.name}.int8")})  # fmt: skip
    runs = pd.DataFrame(rows)
    arms = pd.DataFrame()
    if not runs.empty:
        if runs["map50_95_one2one"].isna().all():  # no NMS-free head among the students
            runs = runs.drop(columns=["map50_95_one2one"])
        means = {c: (c, "mean") for c in HEADS if c in runs}
        arms = (runs.groupby(["architecture", "arm"], sort=False)
                .agg(seeds=("seed", "count"), **means, epoch_s=("epoch_s", "mean"))
                .reset_index())  # fmt: skip
    return runs, arms, pd.DataFrame(list(caches.values()))


def _map_goals(architecture: str, dense: pd.DataFrame, hard: pd.DataFrame,
               top_k: pd.DataFrame, column: str) -> list[str]:  # fmt: skip
    """The mAP goals read through one head's column: cached KD against hard labels (paired
    by seed) and top-K's cost against dense."""
    lines, head = [], HEADS[column]
    if not hard.empty:
        paired = dense.set_index("seed")[column] - hard.set_index("seed")[column]
        gain, same_sign = 100 * paired.mean(), bool((paired > 0).all())
        signs = ", ".join(f"s{s}: {100 * v:+.2f}" for s, v in paired.items())
        lines.append(f"- {architecture}{head}: cached KD - hard labels = {gain:+.2f} mAP50-95 "
                     f"points ({signs}); goal >= +1.0, every seed positive: "
                     f"{'met' if gain >= 1.0 and same_sign else 'not met'}")  # fmt: skip
    if not top_k.empty:
        cost = 100 * (dense[column].mean() - top_k[column].mean())
        lines.append(f"- {architecture}{head}: top-K costs {cost:+.2f} points against dense; "
                     f"goal <= 0.3: {'met' if cost <= 0.3 else 'not met'}")  # fmt: skip
    return lines


def goals(runs: pd.DataFrame, caches: pd.DataFrame) -> list[str]:
    """Issue 25's goals, each with the measured figure and whether it is met."""
    lines = []

    def arm(architecture: str, name: str) -> pd.DataFrame:
        return runs[(runs["architecture"] == architecture) & (runs["arm"] == name)]

    for architecture in sorted(runs["architecture"].unique()) if not runs.empty else []:
        hard, dense = arm(architecture, "hard"), arm(architecture, "cached-dense")
        online, top_k = arm(architecture, "online"), arm(architecture, "cached-top-k")
        if not dense.empty:
            for column in HEADS:  # the one-to-one head's where every dense run has it scored
                if column in runs and dense[column].notna().all():
                    lines += _map_goals(architecture, dense, hard, top_k, column)
        if not hard.empty and not dense.empty:
            ratio = dense["epoch_s"].mean() / hard["epoch_s"].mean()
            lines.append(f"- {architecture}: cached epoch / hard-label epoch = {ratio:.2f}; "
                         f"goal <= 1.10: {'met' if ratio <= 1.10 else 'not met'}")  # fmt: skip
        if not online.empty and not dense.empty:
            gap = 100 * (dense["map50_95"].mean() - online["map50_95"].mean())
            ratio = online["epoch_s"].mean() / dense["epoch_s"].mean()
            lines.append(f"- {architecture}: cached - online = {gap:+.2f} points; goal within "
                         f"0.3: {'met' if abs(gap) <= 0.3 or gap > 0 else 'not met'}; online "
                         f"epoch / cached epoch = {ratio:.2f}, goal >= 1.5: "
                         f"{'met' if ratio >= 1.5 else 'not met'}")  # fmt: skip
    if not caches.empty and {"dense", "top-k"} <= set(caches["kind"]):
        share = (caches[caches["kind"] == "top-k"]["bytes_per_view"].min()
                 / caches[caches["kind"] == "dense"]["bytes_per_view"].min())  # fmt: skip
        lines.append(f"- top-K bytes per view / dense = {share:.3f}; goal <= 0.1: "
                     f"{'met' if share <= 0.1 else 'not met'}")  # fmt: skip
    quantized = runs.dropna(subset=["onnx_fp32", "onnx_int8"]) if not runs.empty else runs
    for _, row in quantized.iterrows():
        drop = 100 * (row["onnx_fp32"] - row["onnx_int8"])
        lines.append(f"- {row['run']}: int8 ONNX {100 * row['onnx_int8']:.2f} against fp32 ONNX "
                     f"{100 * row['onnx_fp32']:.2f} mAP50-95 ({drop:+.2f} points lost); goal "
                     f"<= 1: {'met' if drop <= 1.0 else 'not met'}")  # fmt: skip
    return lines


def markdown(folder: str | Path) -> str:
    """The ``detect`` section: the per-arm table, the caches, the runs, the goals."""
    from kdpipe.tools.publish import machine_line

    folder = Path(folder)
    runs, arms, caches = detection_tables(folder)
    teacher = _map(folder, TEACHER)
    parts = [f"Runs in `{folder}` ({machine_line()}); teacher mAP50-95 {100 * teacher:.2f} "
             f"({_splits(folder)} split of the data YAML, as every row below).", "",
             "Per architecture and arm, mean of the seeds (mAP50-95 in [0, 1]):", ""]  # fmt: skip
    for frame in (arms, caches.drop(columns=["kind"], errors="ignore"), runs):
        if not frame.empty:
            parts += [frame.round(4).to_markdown(index=False), ""]
    parts += ["Goals (issue 25):", "", *goals(runs, caches)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    from kdpipe.tools.publish import replace_section

    folder, page = (argv if argv is not None else sys.argv[1:])[:2]
    text = markdown(folder)
    replace_section(Path(page), "detect", text)
    print(text)


if __name__ == "__main__":
    main()
