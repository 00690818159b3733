"""``make edge``'s table: evaluations of runs and their ONNX files, grouped over seeds.

Reads the CSV rows ``kdpipe evaluate`` wrote (PyTorch run directories and ``.onnx``
files alike), groups them by arm (the run's folder name without ``-s<seed>``) and
format, and writes mean ± std with the goals of issue 15 measured against them.
Run as ``python -m kdpipe.export.results CSV... --csv OUT --markdown FILE``.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from kdpipe.tools.publish import machine_line, publish

FORMATS = {
    "teacher": "PyTorch fp32",
    "student": "PyTorch fp32",
    "qat-student": "PyTorch fp32 (QAT weights)",
    "onnx-fp32": "ONNX fp32",
    "onnx-int8-ptq": "ONNX int8 PTQ",
    "onnx-int8-qat": "ONNX int8 QAT",
}
ARMS = {
    "teacher-r10t": "teacher resnet10t",
    "kd": "kd_cnn distilled (α 0.1, T 4)",
    "qad": "kd_cnn distilled → QAD from the cache",
    "hard": "kd_cnn hard labels (α 1)",
    "hardqat": "kd_cnn hard labels → hard-label QAT",
}


def arm_of(path: str) -> str:
    """``runs/edge/kd-s1.int8.onnx`` and ``runs/edge/qad-s1/model.int8.onnx`` -> kd, qad."""
    parts = Path(path).parts
    name = parts[-2] if parts[-1].startswith("model.") else parts[-1]
    name = name.removesuffix(".onnx").removesuffix(".int8")
    return re.sub(r"-s\d+$", "", name)


def edge_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, format): seeds, test errors, agreement, ECE, size, speed."""
    rows = rows.assign(arm=rows["run"].map(arm_of), format=rows["kind"].map(FORMATS))
    # arms in the order of ARMS, formats from PyTorch to int8, as the chain runs
    rows = rows.assign(
        arm_order=rows["arm"].map({a: i for i, a in enumerate(ARMS)}).fillna(len(ARMS)),
        format_order=rows["kind"].map({k: i for i, k in enumerate(FORMATS)}),
    ).sort_values(["arm_order", "format_order"], kind="stable")
    table = []
    for (arm, fmt), group in rows.groupby(["arm", "format"], sort=False):
        table.append(
            {
                "arm": ARMS.get(arm, arm),
                "format": fmt,
                "seeds": len(group),
                "test errors": _mean_std(group["errors"], "{:.1f}"),
                "errors": group["errors"].mean(),
                "accuracy": round(group["accuracy"].mean(), 4),
                "teacher agreement": round(group["teacher_agreement"].mean(), 4),
                "ECE": round(group["ece"].mean(), 4),
                "size (KiB)": round(group["size_mb"].mean() * 1024, 1),
                "latency p50 (ms)": round(group["latency_ms"].mean(), 4),
                "latency p95 (ms)": round(group["latency_p95_ms"].mean(), 4),
                "img/s at 64": int(group["throughput_b64_img_s"].mean()),
                "threads": int(group["threads"].iloc[0]),
            }
        )
    return pd.DataFrame(table)


def _mean_std(values: pd.Series, fmt: str) -> str:
    if len(values) < 2:
        return fmt.format(values.mean())
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std())}"


def goals(table: pd.DataFrame) -> list[str]:
    """Issue 15's four goals, each with the measured numbers and met / missed."""

    def cell(arm: str, fmt: str, column: str) -> float:
        match = table[(table["arm"] == ARMS[arm]) & (table["format"] == FORMATS[fmt])]
        return float(match[column].iloc[0]) if len(match) else float("nan")

    lines = []
    for arm in ("kd", "hard"):
        fp32_size, int8_size = (
            cell(arm, "onnx-fp32", "size (KiB)"),
            cell(arm, "onnx-int8-ptq", "size (KiB)"),
        )
        fp32_ms, int8_ms = (
            cell(arm, "onnx-fp32", "latency p50 (ms)"),
            cell(arm, "onnx-int8-ptq", "latency p50 (ms)"),
        )
        fp32_errors, ptq_errors = (
            cell(arm, "onnx-fp32", "errors"),
            cell(arm, "onnx-int8-ptq", "errors"),
        )
        lines += [
            f"- {ARMS[arm]}: int8 file {int8_size:.1f} KiB = 1/{fp32_size / int8_size:.2f} of "
            f"fp32 {fp32_size:.1f} KiB (goal ≤ 1/3.5: {_met(fp32_size / int8_size >= 3.5)}); "
            f"int8 batch-1 latency {int8_ms / fp32_ms:.2f}× fp32 ONNX (goal ≤ 0.6×: "
            f"{_met(int8_ms / fp32_ms <= 0.6)}); PTQ {ptq_errors - fp32_errors:+.1f} errors = "
            f"{(ptq_errors - fp32_errors) / 100:+.2f} points against fp32 (goal within 1 point: "
            f"{_met(abs(ptq_errors - fp32_errors) <= 100)})"
        ]
    qad, ptq = cell("qad", "onnx-int8-qat", "errors"), cell("kd", "onnx-int8-ptq", "errors")
    hard_qat = cell("hardqat", "onnx-int8-qat", "errors")
    lines.append(
        f"- QAD int8 {qad:.1f} errors against PTQ int8 {ptq:.1f} (goal QAD ≥ PTQ, i.e. no more "
        f"errors: {_met(qad <= ptq)}) and hard-label QAT int8 {hard_qat:.1f} (goal QAD better: "
        f"{_met(qad < hard_qat)})"
    )
    return lines


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def section(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["errors"])
    return "\n".join(
        [
            "Generated by `python -m kdpipe.export.results` on "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC from `kdpipe evaluate` rows "
            "(Fashion-MNIST test split, 10,000 images; "
            "agreement with the teacher's test-split cache). Sizes are the whole file on disk "
            "(weights inside it, no `.onnx.data`); latencies are batch 1, p50 and p95 of 200 "
            "calls after warm-up; PyTorch eager and ONNX Runtime's CPU provider each get the "
            "thread count shown.",
            f"Machine: {machine_line()}.",
            "",
            shown.to_markdown(index=False),
            "",
            "Goals of issue 15, measured:",
            "",
            *goals(table),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csvs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--section", default="edge")
    args = parser.parse_args(argv)
    rows = pd.concat([pd.read_csv(path) for path in args.csvs], ignore_index=True)
    table = edge_table(rows)
    publish(table, csv_path=args.csv, markdown_path=args.markdown, section=args.section,
            text=lambda: section(table))  # fmt: skip
    print(section(table))


if __name__ == "__main__":
    main()
