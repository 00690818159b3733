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
                 "P5_cost_S1", "P5_cost_S4", "P5_cost_S16",
                 *(f"P6_{c}_{u}" for c in ("help", "caches", "verify", "lineage", "report",
                                           "storage") for u in ("s", "peak_mib"))):  # fmt: skip
        assert name in names, name
    values = table.set_index("name")["value"]
    assert (values > 0).all()
    # P5's cost ratio comes from the measured times: online / (teacher pass + S x E x cached)
    times = {n: values[f"{n}_s"] for n in ("teacher_pass", "cached_epoch", "online_epoch")}
    expected = (
        16 * 30 * times["online_epoch"] / (times["teacher_pass"] + 16 * 30 * times["cached_epoch"])
    )
    assert abs(values["P5_cost_S16"] - expected) < 1e-9
    # P6: a command that reads records says what it imported (issue 27.14)
    what = table.set_index("name")["what"]
    assert "imported no deep-learning library" in what["P6_caches_s"], what["P6_caches_s"]
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand\n")
    assert "<!-- kdpipe:bench-cpu:begin -->" in text and "| P4_streamed" in text
    assert "kdpipe bench --out " in text and "--data synthetic --fraction 1.0" in text


def test_committed_benchmarks_match_their_csvs() -> None:
    """Every figure in docs/benchmarks.md's generated sections is its CSV's, as measured."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "benchmarks.md").read_text()
    for section, csv_name in (("bench-cpu", "bench-cpu.csv"), ("bench-cuda", "bench-cuda.csv"),
                              ("bench-cuda-b1024", "bench-cuda-b1024.csv"),
                              ("bench-folder-cpu", "bench-folder-cpu.csv")):  # fmt: skip
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
            # the table shows 3 significant figures, which tabulate writes as a plain number
            # (1.15e+03 as 1150)
            assert float(shown[name]) == float(f"{value:.3g}"), (section, name)


# --- the measured section on real files (pipeline/tools/benchfolder.py) ----------------------


def _jpeg_folder(out: Path, train: int, test: int) -> dict:
    from kdpipe.tools.benchfolder import build_jpeg_folder

    return build_jpeg_folder(out, {"train": train, "test": test}, source="synthetic",
                             workers=2, log=lambda line: None)  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*.jpg"))}  # fmt: skip


def test_jpeg_folder_is_rebuilt_bit_identically(tmp_path: Path) -> None:
    from PIL import Image

    first = _jpeg_folder(tmp_path / "a", 40, 10)
    again = _jpeg_folder(tmp_path / "b", 40, 10)
    assert first["files_sha256"] == again["files_sha256"]
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") and len(files) == 50
    # a smaller folder is the larger one's first images, byte for byte
    _jpeg_folder(tmp_path / "c", 20, 5)
    small = _files(tmp_path / "c")
    assert len(small) == 25 and all(files[name] == data for name, data in small.items())
    # <split>/<label:02d>-<class>/<index:05d>.jpg: the sorted class folders are the labels
    assert {name.split("/")[1] for name in files} == {"00-a", "01-b", "02-c", "03-d", "04-e"}
    sides, colours = set(), set()
    for path in sorted((tmp_path / "a").rglob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.width == image.height and 140 <= image.width <= 200
            sides.add(image.width)
            colours.add(image.getpixel((0, 0)))
    assert len(sides) > 10 and len(colours) > 10  # drawn per image, not one for all
    assert (tmp_path / "a" / "RECIPE.json").is_file()
    # another seed is another folder
    from kdpipe.tools.benchfolder import JpegRecipe, build_jpeg_folder

    other = build_jpeg_folder(tmp_path / "d", {"train": 40, "test": 10}, source="synthetic",
                              recipe=JpegRecipe(seed=1), workers=1,
                              log=lambda line: None)  # fmt: skip
    assert other["files_sha256"] != first["files_sha256"]


def test_jpeg_folder_bad_inputs_are_one_line(tmp_path: Path) -> None:
    from conftest import fails

    fails(invoke("jpeg-folder --data-root", tmp_path / "nothing", "--dest", tmp_path / "f"),
          "is missing: run 'make data'")  # fmt: skip
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fails(invoke("jpeg-folder --dest", tmp_path / "full"), "pass --overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_bench_folder_writes_every_ratio(tmp_path: Path) -> None:
    large, small = tmp_path / "large", tmp_path / "small"
    _jpeg_folder(large, 48, 16)
    _jpeg_folder(small, 24, 8)
    markdown, csv = tmp_path / "benchmarks.md", tmp_path / "folder.csv"
    markdown.write_text("# Benchmarks\n\nwritten by hand\n")
    result = invoke("bench-folder --teacher kd_cnn --student kd_cnn --image-size 16 "
                    "--batch-size 16 --epochs 3 --repeats 1 --workers 0 --folder", large,
                    "--small", small, "--out", tmp_path / "work", "--markdown", markdown,
                    "--csv", csv)  # fmt: skip
    assert result.exit_code == 0, result.output
    values = pd.read_csv(csv).set_index("name")["value"]
    for name in ("rss_cache_teacher_small_MiB", "rss_cache_teacher_large_MiB",
                 "M1_rss_cache_teacher", "rss_train_student_small_MiB",
                 "rss_train_student_large_MiB", "M1_rss_train_student",
                 "cache_teacher_rows_per_s", "timm_loop_rows_per_s", "M2_teacher_rows",
                 "cached_epoch_s", "hard_epoch_s", "M3_epoch", "api_items_epoch_s",
                 "api_batches_epoch_s", "api_items_vs_batches",
                 "api_batches_vs_cached"):  # fmt: skip
        assert name in values.index, name
        assert values[name] > 0, name
    # each ratio is its measured quantities', and a peak RSS is a process's (over 50 MiB
    # with torch loaded), not a sentinel
    for command in ("cache_teacher", "train_student"):
        peaks = values[f"rss_{command}_large_MiB"], values[f"rss_{command}_small_MiB"]
        assert abs(values[f"M1_rss_{command}"] - peaks[0] / peaks[1]) < 1e-9
        assert min(peaks) > 50
    rates = values["cache_teacher_rows_per_s"] / values["timm_loop_rows_per_s"]
    assert abs(values["M2_teacher_rows"] - rates) < 1e-9
    assert abs(values["M3_epoch"] - values["cached_epoch_s"] / values["hard_epoch_s"]) < 1e-9
    api = values["api_items_epoch_s"] / values["api_batches_epoch_s"]
    assert abs(values["api_items_vs_batches"] - api) < 1e-9
    # every arm ran in its own process and left its log, and a cache of each folder exists
    arms = sorted(p.stem for p in (tmp_path / "work" / "arms").glob("*.log"))
    assert arms == sorted(f"{name}-0" for name in (
        "timm_loop", "cache_teacher_large", "cache_teacher_small", "hard_large",
        "student_large", "student_small", "api_items", "api_batches"))  # fmt: skip
    for label, count in (("large", 48), ("small", 24)):
        from kdpipe.cache import read_manifest

        assert read_manifest(tmp_path / "work" / f"cache-{label}.zarr").num_samples == count
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand\n")
    assert "<!-- kdpipe:bench-folder-cpu:begin -->" in text and "| M2_teacher_rows" in text
    assert "kdpipe bench-folder --out " in text and "--teacher kd_cnn" in text


def test_bench_folder_bad_inputs_are_one_line(tmp_path: Path) -> None:
    from conftest import fails

    folder = tmp_path / "folder"
    _jpeg_folder(folder, 10, 5)
    base = "bench-folder --teacher kd_cnn --out"
    fails(invoke(base, tmp_path / "w", "--folder", tmp_path / "missing", "--small", folder),
          "has no train/ folder: build it with `make jpeg-folder`")  # fmt: skip
    fails(invoke(base, tmp_path / "w", "--folder", folder, "--small", tmp_path / "missing"),
          "--small")  # fmt: skip
    fails(invoke(base, tmp_path / "w", "--folder", folder, "--small", folder), "the same folder")
    other = tmp_path / "other"
    _jpeg_folder(other, 10, 5)
    # --out is replaced: never the data, nor a folder holding it
    for out in (folder, tmp_path):
        fails(invoke(base, out, "--folder", folder, "--small", other), str(folder))
    assert (folder / "RECIPE.json").is_file() and (other / "RECIPE.json").is_file()


def test_the_scale_bench_measures_a_small_shape(tmp_path: Path) -> None:
    """make scale's measurement on a tiny shape: the cache is written by cache-teacher's
    path, verified, read whole by the student's access pattern from disk and from the
    counting S3 server (its GETs and bytes counted there, in its own process)."""
    from kdpipe.tools.scale import ScaleConfig, measure

    config = ScaleConfig(work=tmp_path / "scale", rows=3000, classes=20, views=2, top_k=5,
                         chunk_size=512, memory=64 << 20)  # fmt: skip
    result = measure(config, log=lambda _line: None)
    assert result["chunks"] == 6 and result["verify_ok"]
    # per chunk: indices, labels, the top-K values and classes, views, partners, position
    # digests, progress flag; plus the group's and each array's zarr.json
    assert result["files"] == 6 * 8 + 9
    assert result["local"]["rows"] == 3000 and result["object_store"]["rows"] == 3000
    remote = result["object_store"]
    assert remote["gets"] >= 6 * 5  # every chunk of every per-view array read, once at least
    assert remote["get_bytes"] >= 0.5 * result["bytes"]
