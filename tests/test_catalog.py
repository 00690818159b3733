"""kdpipe caches and kdpipe lineage: which teacher version made which cache and student."""

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import cache, invoke, student
from kdpipe.base.errors import ManifestError
from kdpipe.cache import Upstream, derive_cache_id, read_manifest
from kdpipe.models.runs import read_card


def test_three_caches_from_two_teacher_versions(teacher_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "teacher-v2"
    trained = invoke(
        "train-teacher --model kd_cnn --data synthetic --epochs 1 --seed 7 --out", other
    )
    assert trained.exit_code == 0
    folder = tmp_path / "caches"
    for name, teacher, temperature in (
        ("a-T2", teacher_run, 2),
        ("a-T4", teacher_run, 4),
        ("b-T2", other, 2),
    ):
        made = cache(teacher, folder / "nested" / f"{name}.zarr", f"--temperature {temperature}")
        assert made.exit_code == 0, made.output
    (folder / "not-a-cache").mkdir()
    result = invoke("caches", folder, "--format csv")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output)).set_index("path")
    table.index = [Path(p).name for p in table.index]
    assert sorted(table.index) == ["a-T2.zarr", "a-T4.zarr", "b-T2.zarr"]
    version_a = read_card(teacher_run).weights_sha256[:8]
    version_b = read_card(other).weights_sha256[:8]
    assert table.loc["a-T2.zarr", "teachers"] == f"kd_cnn@{version_a}"
    assert table.loc["a-T4.zarr", "teachers"] == f"kd_cnn@{version_a}"
    assert table.loc["b-T2.zarr", "teachers"] == f"kd_cnn@{version_b}"
    assert table.loc["a-T2.zarr", "teacher_id"] == table.loc["a-T4.zarr", "teacher_id"]
    assert table.loc["a-T2.zarr", "teacher_id"] != table.loc["b-T2.zarr", "teacher_id"]
    assert table.loc["a-T2.zarr", "cache_id"] != table.loc["a-T4.zarr", "cache_id"]
    assert set(table["temperature"]) == {2.0, 4.0} and set(table["status"]) == {"complete"}
    assert (table["size_mb"] > 0).all()


def test_caches_names_each_cache_s_storage_layout(teacher_run: Path, tmp_path: Path) -> None:
    """A top-k cache is listed as top-k, not as dense (a bug until the layout object)."""
    for name, extra in (("dense", ""), ("top3", "--top-k 3")):
        made = cache(teacher_run, tmp_path / f"{name}.zarr", f"--temperature 2 {extra}")
        assert made.exit_code == 0, made.output
    result = invoke("caches", tmp_path, "--format json")
    assert result.exit_code == 0, result.output
    storage = {Path(row["path"]).name: row["storage"] for row in json.loads(result.output)}
    assert storage == {"dense.zarr": "dense", "top3.zarr": "top-3"}


def test_a_damaged_cache_is_listed_as_unreadable(train_cache: Path, tmp_path: Path) -> None:
    shutil.copytree(train_cache, tmp_path / "bad.zarr")
    (tmp_path / "bad.zarr" / "zarr.json").write_text('{"attributes": {"kdpipe": {')
    result = invoke("caches", tmp_path, "--format json")
    (row,) = json.loads(result.output)
    assert row["status"].startswith("unreadable") and "not valid JSON" in row["status"]


def test_lineage_links_student_cache_teacher_dataset(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    assert student(train_cache, tmp_path / "s").exit_code == 0
    result = invoke("lineage", tmp_path / "s", "--format json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)
    assert [row["link"] for row in chain] == ["student", "cache", "teacher", "dataset"]
    assert {row["status"] for row in chain} == {"verified"}
    assert chain[1]["id"] == read_card(tmp_path / "s").lineage["cache_id"]

    # the cache moved away: the chain says where it broke, and exits 0 (nothing contradicts)
    own = tmp_path / "own.zarr"
    shutil.copytree(train_cache, own)
    assert student(own, tmp_path / "s2").exit_code == 0
    own.rename(tmp_path / "gone.zarr")
    result = invoke("lineage", tmp_path / "s2", "--format json")
    statuses = {row["link"]: row["status"] for row in json.loads(result.output)}
    assert result.exit_code == 0 and statuses["cache"] == "missing"
    assert statuses["student"] == "verified"

    # a cache with another id at the recorded path is a mismatch
    assert cache(teacher_run, own, "--temperature 3 --chunk-size 128").exit_code == 0
    result = invoke("lineage", tmp_path / "s2")
    assert result.exit_code == 1 and "MISMATCH" in result.output
    assert "does not match its record" in result.output

    # an edited model card is a mismatch of the run itself (its weights carry its digest)
    card = json.loads((tmp_path / "s" / "model.json").read_text())
    card["lineage"]["cache_path"] = str(tmp_path / "elsewhere.zarr")
    (tmp_path / "s" / "model.json").write_text(json.dumps(card))
    result = invoke("lineage", tmp_path / "s", "--format json")
    assert result.exit_code == 1
    (first, *_) = json.loads(result.output.split("\nError:")[0])
    assert first["status"] == "MISMATCH" and "was edited after training" in first["detail"]


def test_lineage_of_a_resized_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for index, label in enumerate(("a", "b")):
            (root / split / label).mkdir(parents=True)
            Image.new("L", (10, 10), 40 + 100 * index).save(root / split / label / "0.png")
    teacher, store, pupil = tmp_path / "t", tmp_path / "c.zarr", tmp_path / "s"
    sized = "--image-size 8 --data"
    assert (
        invoke(f"train-teacher --model kd_cnn --epochs 1 {sized}", root, "--out", teacher).exit_code
        == 0
    )
    assert (
        invoke(
            f"cache-teacher --temperature 2 {sized}", root, "--teacher", teacher, "--out", store
        ).exit_code
        == 0
    )
    trained = invoke(
        f"train-student --model kd_mlp_30x2 --alpha 0.5 --epochs 1 {sized}",
        root,
        "--cache",
        store,
        "--out",
        pupil,
    )
    assert trained.exit_code == 0, trained.output
    result = invoke("lineage", pupil, "--image-size 8 --format json")
    assert result.exit_code == 0, result.output
    assert {row["status"] for row in json.loads(result.output)} == {"verified"}
    # without --image-size the size comes from the records' dataset.decode (issue 27.3: this
    # was "MISMATCH the data on disk has another fingerprint", exit 1)
    unsized = invoke("lineage", pupil, "--format json")
    assert unsized.exit_code == 0, unsized.output
    assert {row["status"] for row in json.loads(unsized.output)} == {"verified"}


def test_lineage_walks_a_three_stage_chain_back_to_the_first_teacher(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    """t -> c0 -> ta -> c1 -> tb -> c2 -> s: every link verified; with ta and c1 deleted,
    the chain is still walked from the manifests' records (c1 'recorded', ta 'missing')."""
    c0, ta, c1, tb, c2, s = (train_cache, tmp_path / "ta", tmp_path / "c1.zarr",
                             tmp_path / "tb", tmp_path / "c2.zarr", tmp_path / "s")  # fmt: skip
    for pupil, soft, store in ((ta, c0, c1), (tb, c1, c2)):
        assert student(soft, pupil).exit_code == 0
        made = cache(pupil, store, "--temperature 3 --chunk-size 256")
        assert made.exit_code == 0, made.output
    assert student(c2, s).exit_code == 0
    ids = {path: read_manifest(path).cache_id for path in (c0, c1, c2)}
    recorded = read_manifest(c2).teachers[0].lineage
    assert recorded.cache_id == ids[c1] and recorded.teachers[0].run_dir == str(ta)
    assert recorded.teachers[0].lineage.cache_id == ids[c0]
    assert recorded.teachers[0].lineage.teachers[0].lineage is None  # t: trained on labels
    expected = [("student", s), ("cache", c2), ("teacher", tb), ("cache", c1),
                ("teacher", ta), ("cache", c0), ("teacher", teacher_run)]  # fmt: skip
    result = invoke("lineage", s, "--format json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)
    assert [(row["link"], row["path"]) for row in chain[:-1]] == [
        (kind, str(path)) for kind, path in expected
    ]
    assert chain[-1]["link"] == "dataset" and len(chain) == len(expected) + 1
    assert {row["status"] for row in chain} == {"verified"}
    assert [row["id"] for row in chain if row["link"] == "cache"] == [ids[c2], ids[c1], ids[c0]]

    listed = json.loads(invoke("caches", tmp_path, c0, "--format json").output)
    assert {Path(row["path"]).name: row["generation"] for row in listed} == {
        "c1.zarr": 1, "c2.zarr": 2, c0.name: 0}  # fmt: skip

    shutil.rmtree(ta)  # the middle of the chain is gone: the manifests still know it
    shutil.rmtree(c1)
    result = invoke("lineage", s, "--format json")
    assert result.exit_code == 0, result.output
    statuses = [(row["link"], row["path"], row["status"]) for row in json.loads(result.output)]
    assert statuses[:-1] == [
        (kind, str(path), {ta: "missing", c1: "recorded"}.get(path, "verified"))
        for kind, path in expected
    ]
    assert statuses[-1][2] == "verified"


def test_a_first_generation_record_is_what_it_was(train_cache: Path) -> None:
    """A cache of a teacher trained on labels records no lineage: its manifest has exactly
    the fields it had, and its ids do not depend on the new field."""
    manifest = read_manifest(train_cache)
    assert "lineage" not in manifest.to_dict()["teachers"][0]
    assert manifest.teacher_generation == 0
    member = manifest.teachers[0]
    upstream = Upstream(cache_id="x", teacher_id="y", cache_path="p", combine=None,
                        dataset=None, teachers=None)  # fmt: skip
    linked = replace(manifest, teachers=(replace(member, lineage=upstream),))
    assert derive_cache_id(linked) == manifest.cache_id
    assert linked.teacher_generation is None  # the chain above was not recorded


def test_member_lineage_is_parsed_strictly() -> None:
    good = {"cache_id": "a", "teacher_id": "b", "cache_path": "c", "combine": None,
            "dataset": None, "teachers": None}  # fmt: skip
    assert Upstream.from_dict(good, "lineage").teachers is None
    for bad, message in (
        ({**good, "extra": 1}, "unknown field(s) extra"),
        ({k: v for k, v in good.items() if k != "cache_path"}, "missing field(s) cache_path"),
        ({**good, "cache_id": 3}, "'cache_id' has type int"),
        ({**good, "teachers": []}, "need a combine rule and at least one member"),
        ({**good, "combine": "vote"}, "combine 'vote' is not one of"),
    ):
        with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Upstream.from_dict(bad, "lineage")
