"""make bench's measurements run end to end (on tiny data: structure, not speed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from conftest import invoke


def test_bench_writes_every_ratio(tmp_path: Path) -> None:
    markdown, csv = tmp_path / "benchmarks.md", tmp_path / "bench.csv"
    markdown.write_text("# Benchmarks\n\nwritten by hand\n")
    result = invoke("bench --data synthetic --fraction 1 --teacher kd_cnn --student kd_mlp_30x2 "
                    "--chunk-size 128 --epochs 3 --repeats 1 --out", tmp_path / "work",
                    "--markdown", markdown, "--csv", csv)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(csv)
    names = set(table["name"])
    for name in ("P1", "P2", "P3", "P3_ideal", "P4_memory", "P4_streamed", "P4_train_streamed",
                 "P5_bytes_dense_float32", "P5_bytes_dense_float16", "P5_bytes_top-1_float16",
                 "P5_cost_S1", "P5_cost_S4", "P5_cost_S16"):  # fmt: skip
        assert name in names, name
    values = table.set_index("name")["value"]
    assert (values > 0).all()
    # P5's cost ratio comes from the measured times: online / (teacher pass + S x E x cached)
    times = {n: values[f"{n}_s"] for n in ("teacher_pass", "cached_epoch", "online_epoch")}
    expected = (
        16 * 30 * times["online_epoch"] / (times["teacher_pass"] + 16 * 30 * times["cached_epoch"])
    )
    assert abs(values["P5_cost_S16"] - expected) < 1e-9
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand\n")
    assert "<!-- kdpipe:bench-cpu:begin -->" in text and "| P4_streamed" in text
    assert "kdpipe bench --out " in text and "--data synthetic --fraction 1.0" in text


def test_committed_benchmarks_match_their_csvs() -> None:
    """Every figure in docs/benchmarks.md's generated sections is its CSV's, as measured."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "benchmarks.md").read_text()
    for section, csv_name in (("bench-cpu", "bench-cpu.csv"), ("bench-cuda", "bench-cuda.csv"),
                              ("bench-cuda-b1024", "bench-cuda-b1024.csv")):  # fmt: skip
        begin, end = f"<!-- kdpipe:{section}:begin -->", f"<!-- kdpipe:{section}:end -->"
        body = text[text.index(begin) : text.index(end)]
        shown = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            header = cells[0] in ("name", "") or set(cells[0]) <= set(":-")
            if line.startswith("|") and len(cells) == 4 and not header:
                shown[cells[0]] = cells[1]
        table = pd.read_csv(root / "docs" / "results" / csv_name)
        assert set(shown) == set(table["name"]), section
        for name, value in zip(table["name"], table["value"], strict=True):
            assert shown[name] == f"{value:.3g}", (section, name)
