"""WebDataset shards: packed from a folder, read locally and through fsspec, row per key,
the same cache values as the folder, the fingerprint under each kind of edit, and each
malformed shard named in one line."""

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset
import zarr
from conftest import invoke
from kdpipe.api import DistillationDataset
from kdpipe.base.errors import CacheMismatchError, DatasetError
from kdpipe.data.datasets import load_dataset
from kdpipe.data.imagefolder import batches_of
from PIL import Image
from test_imagefolder import colour_folder, error_lines, peak_bytes


def png(shade: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """One shard of ``samples`` (WebDataset dicts) through webdataset's own writer."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def small_shards(root: Path, count: int = 6) -> Path:
    """Two train shards of ``count`` samples with keys k00.., labels alternating, classes.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("x\ny\n")
    samples = [{"__key__": f"k{i:02d}", "png": png(30 * i), "cls": i % 2} for i in range(count)]
    write_shard(root / "train-000000.tar", samples[: count // 2])
    write_shard(root / "train-000001.tar", samples[count // 2 :])
    return root


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every data array of a cache, by name (the values, views, labels, indices ...); not
    ``chunk_digests``, which cover the cache's id and so the dataset's fingerprint."""
    group = zarr.open_group(str(store), mode="r")
    found = {name: np.asarray(array[...]) for name, array in group.arrays()}
    assert found.pop("chunk_digests").shape[0] >= 1
    return found


# --- end to end --------------------------------------------------------------------------------


def test_pack_cache_verify_train_evaluate_on_shards_with_the_folders_values(
    tmp_path: Path,
) -> None:
    """pack-shards → train-teacher → cache-teacher (views, workers) → verify → train-student →
    evaluate on the shards; the cache holds the same values as one made from the folder."""
    folder = colour_folder(tmp_path / "imgs", {"train": 9, "test": 4}, size=10)
    shards = tmp_path / "shards"
    packed = invoke("pack-shards", folder, "--out", shards, "--shard-size 5")
    assert packed.exit_code == 0, packed.output
    assert sorted(p.name for p in shards.glob("*.tar")) == [
        *(f"test-00000{i}.tar" for i in range(2)),
        *(f"train-00000{i}.tar" for i in range(4)),
    ]
    on_folder, on_shards = load_dataset(str(folder), "train"), load_dataset(str(shards), "train")
    assert on_shards.streamed and len(on_shards) == 18 and on_shards.classes == ("a", "b")
    rows = torch.tensor([17, 0, 9, 4])  # random access, across shards
    assert torch.equal(on_shards.images[rows], on_folder.images[rows])
    assert torch.equal(on_shards.labels, on_folder.labels)
    teacher, pupil = tmp_path / "t", tmp_path / "s"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", shards, "--out", teacher)
    assert made.exit_code == 0, made.output
    views = "--temperature 2 --views 2 --augment crop-flip --mix mixup --batch-size 4"
    stores = {}
    for name, data, workers in (("shards", shards, 2), ("folder", folder, 0)):
        stores[name] = tmp_path / f"{name}.zarr"
        cached = invoke("cache-teacher --data", data, "--teacher", teacher, "--out",
                        stores[name], views, f"--workers {workers}")  # fmt: skip
        assert cached.exit_code == 0, cached.output
    from_shards, from_folder = arrays(stores["shards"]), arrays(stores["folder"])
    assert from_shards.keys() == from_folder.keys()
    for name, values in from_shards.items():
        np.testing.assert_array_equal(values, from_folder[name], err_msg=name)
    verified = invoke("verify", stores["shards"], "--data", shards, "--teacher", teacher,
                      "--recompute 6")  # fmt: skip
    assert verified.exit_code == 0, verified.output
    distilled = invoke("train-student --model kd_mlp_30x2 --epochs 1 --alpha 0.5 --data", shards,
                       "--cache", stores["shards"], "--out", pupil, "--workers 1")  # fmt: skip
    assert distilled.exit_code == 0, distilled.output
    items = DistillationDataset(on_shards, stores["shards"])  # the Python API, item by item
    image, label, target = items[11][:3]
    assert image.shape == (3, 10, 10) and target.shape == (2,) and int(label) == 1
    scored = invoke("evaluate", pupil, "--data", shards, "--format json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output[scored.output.index("[") :])[0]["samples"] == 8
    # the folder's cache is not the shards' (another dataset: keys, not paths, are rows)
    wrong = invoke("verify", stores["folder"], "--data", shards)
    assert len(error_lines(wrong)) == 1 and f"train shards of {shards} changed" in wrong.output


def test_a_cache_from_shards_read_through_an_fsspec_url(tmp_path: Path) -> None:
    """The same shards in fsspec's memory filesystem (ranged reads, the index stored there)
    give the same rows, fingerprint and cache values as on the disk."""
    shards = small_shards(tmp_path / "shards", count=8)
    memory = fsspec.filesystem("memory")
    for path in shards.iterdir():
        memory.pipe_file(f"/kd-test-shards/{path.name}", path.read_bytes())
    url = "memory://kd-test-shards"
    try:
        local, remote = load_dataset(str(shards), "train"), load_dataset(url, "train")
        assert remote.fingerprint() == local.fingerprint()
        assert torch.equal(remote.images[[7, 2, 5]], local.images[[7, 2, 5]])
        assert memory.isfile("/kd-test-shards/.kdpipe-index-train.json")
        teacher = tmp_path / "t"
        made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", shards, "--out",
                      teacher)  # fmt: skip
        assert made.exit_code == 0, made.output
        for data, out in ((url, "m.zarr"), (shards, "l.zarr")):
            cached = invoke("cache-teacher --temperature 2 --views 2 --augment crop-flip --data",
                            data, "--teacher", teacher, "--out", tmp_path / out)  # fmt: skip
            assert cached.exit_code == 0, cached.output
        assert invoke("verify", tmp_path / "m.zarr", "--data", url).exit_code == 0
        from_url, from_disk = arrays(tmp_path / "m.zarr"), arrays(tmp_path / "l.zarr")
        for name, values in from_url.items():
            np.testing.assert_array_equal(values, from_disk[name], err_msg=name)
        # a pattern with {split} and a brace range names the same shards
        pattern = "memory://kd-test-shards/{split}-{000000..000001}.tar"
        assert load_dataset(pattern, "train").fingerprint() == local.fingerprint()
    finally:
        memory.rm("/kd-test-shards", recursive=True)


def test_shards_where_nothing_can_be_written_keep_their_index_in_memory(tmp_path: Path) -> None:
    """Shards inside a zip file (fsspec's zip filesystem, read-only): the index is built in
    memory on each open, and the rows are the same."""
    shards = small_shards(tmp_path / "shards")
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as packed:
        for path in shards.glob("*[!n]"):  # the shards and classes.txt, not the index
            packed.write(path, path.name)
    url = f"zip://::file://{archive}"
    first, again = load_dataset(url, "train"), load_dataset(url, "train")
    local = load_dataset(str(shards), "train")
    assert first.fingerprint() == again.fingerprint() == local.fingerprint()
    assert torch.equal(first.images[[5, 0]], local.images[[5, 0]])
    assert sorted(zipfile.ZipFile(archive).namelist()) == [
        "classes.txt",
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_rows_decode_ahead_in_workers_and_a_changed_shard_is_refused(tmp_path: Path) -> None:
    shards = small_shards(tmp_path / "shards")
    data = load_dataset(str(shards), "train")
    requests = [torch.tensor([5, 0]), torch.tensor([3]), torch.tensor([1, 2, 4])]
    ahead = list(batches_of(data.images.with_workers(2), requests))
    for request, batch in zip(requests, ahead, strict=True):
        assert torch.equal(batch, data.images[request])
    # the shard rewritten after the index was read: the row's bytes are not the indexed ones
    changed = [{"__key__": f"k{i:02d}", "png": png(200 - i), "cls": i % 2} for i in range(3)]
    write_shard(shards / "train-000000.tar", changed)
    with pytest.raises(DatasetError, match=r"train-000000\.tar changed since it was indexed"):
        data.images[0]


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path: Path) -> None:
    """Opening shards (each read once for the index) and a teacher pass over them: the peak
    grows by the index's entries, far less than the pixels (the image folder's bound)."""

    def packed(name: str, count: int) -> Path:
        folder = colour_folder(tmp_path / name, {"train": count}, size=48)
        made = invoke(
            "pack-shards", folder, "--out", tmp_path / f"{name}-shards", "--shard-size 50"
        )
        assert made.exit_code == 0, made.output
        return tmp_path / f"{name}-shards"

    peak_bytes(packed("warm", 2))
    small = peak_bytes(packed("small", 20))  # 40 samples, one shard
    large = peak_bytes(packed("large", 200))  # 400 samples, 8 shards
    assert large[0] - small[0] < 0.5 * (large[1] - small[1]), (small, large)


# --- the index and the fingerprint -------------------------------------------------------------


def test_the_shard_fingerprint_changes_with_each_kind_of_edit_and_only_then(
    tmp_path: Path,
) -> None:
    shards = small_shards(tmp_path / "shards")
    stored = shards / ".kdpipe-index-train.json"

    def fingerprint() -> str:
        return load_dataset(str(shards), "train").fingerprint()["sha256"]

    first = fingerprint()
    written = stored.stat().st_mtime_ns
    assert fingerprint() == first and stored.stat().st_mtime_ns == written  # reused as is
    record = json.loads(stored.read_text())
    with tarfile.open(shards / "train-000000.tar") as tar:  # Python's own reading of the tar
        offset = tar.getmember("k01.png").offset_data
    assert record["shards"][0]["samples"][1] == {
        "key": "k01",
        "shard": "train-000000.tar",
        "member": "k01.png",
        "offset": offset,
        "size": len(png(30)),
        "label": 1,
        "sha256": hashlib.sha256(png(30)).hexdigest(),
        "height": 6,
        "width": 6,
        "channels": 3,
    }
    with open(shards / "train-000000.tar", "rb") as tar:  # the offset is the member's data
        tar.seek(record["shards"][0]["samples"][1]["offset"])
        assert tar.read(len(png(30))) == png(30)
    keys = [s["key"] for shard in record["shards"] for s in shard["samples"]]
    assert keys == [f"k{i:02d}" for i in range(6)]
    stored.write_text("{ damaged")
    assert fingerprint() == first  # rebuilt from the shards
    # re-sharded (the same samples, one shard, another order inside): the same rows
    samples = [{"__key__": f"k{i:02d}", "png": png(30 * i), "cls": i % 2} for i in range(6)]
    other = small_shards(tmp_path / "other", count=0)
    write_shard(other / "train-000000.tar", samples[::-1])
    assert load_dataset(str(other), "train").fingerprint()["sha256"] == first
    seen = {first}

    def edited(shard: str, content: list[dict]) -> None:
        write_shard(shards / shard, content)
        now = fingerprint()
        assert now not in seen
        seen.add(now)

    head = samples[:3]
    edited("train-000000.tar", [*head[:2], {**head[2], "__key__": "k99"}])  # renamed
    edited("train-000000.tar", [*head[:2], {**head[2], "cls": 1}])  # relabelled (k02 was 0)
    edited("train-000000.tar", [*head[:2], {**head[2], "png": png(3)}])  # edited
    edited("train-000000.tar", head[:2])  # removed
    edited("train-000002.tar", [{"__key__": "k50", "png": png(7), "cls": 1}])  # added
    assert load_dataset(str(shards), "train", image_size=8).fingerprint()["sha256"] not in seen


# --- errors ------------------------------------------------------------------------------------


def test_malformed_shards_are_named_in_one_line(tmp_path: Path) -> None:
    image = png(10)
    cases = {
        "duplicate key": ([[{"__key__": "a", "png": image, "cls": 0}],
                           [{"__key__": "a", "png": image, "cls": 1}]],
                          r"key a appears twice \(in shard train-000000\.tar and shard "
                          r"train-000001\.tar\)"),
        "no label": ([[{"__key__": "a", "png": image}]], r"train-000000\.tar: sample a has no cls"),
        "no image": ([[{"__key__": "a", "txt": "hi", "cls": 0}]], r"sample a has no image"),
        "bad image": ([[{"__key__": "a", "jpg": b"\xff\xd8 no", "cls": 0}]],
                      r"^cannot read image a\.jpg \(shard .*train-000000\.tar\): "),
        "label": ([[{"__key__": "a", "png": image, "cls": 2}]],
                  r"sample a has label 2, outside the 2 classes"),
    }  # fmt: skip
    for name, (shards, message) in cases.items():
        root = small_shards(tmp_path / name.replace(" ", "-"), count=0)
        for number, samples in enumerate(shards):
            write_shard(root / f"train-{number:06d}.tar", samples)
        with pytest.raises(DatasetError, match=message):
            load_dataset(str(root), "train")
        assert not (root / ".kdpipe-index-train.json").exists(), name  # nothing stored
    two_members = tmp_path / "twice" / "train-000000.tar"
    small_shards(two_members.parent, count=0)
    with tarfile.open(two_members, "w") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("a.png")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    with pytest.raises(DatasetError, match="key a appears twice"):
        load_dataset(str(two_members.parent), "train")
    root = small_shards(tmp_path / "no-test")
    with pytest.raises(DatasetError, match=r"has no test shards \(expected test-\*\.tar"):
        load_dataset(str(root), "test")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"has no classes\.txt or classes\.json"):
        load_dataset(str(root), "train")
    (root / "classes.json").write_text(json.dumps(["x", "y"]))
    assert load_dataset(str(root), "train").classes == ("x", "y")
    with pytest.raises(
        DatasetError, match=r"train-000002\.tar does not exist \(8 of the 10 shards"
    ):
        load_dataset(str(root / "{split}-{000000..000009}.tar"), "train")


def test_a_bad_shard_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    shards = small_shards(tmp_path / "shards")
    teacher = tmp_path / "t"
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", shards, "--out", teacher)
    assert made.exit_code == 0, made.output
    store = tmp_path / "c.zarr"
    assert invoke("cache-teacher --temperature 2 --data", shards, "--teacher", teacher, "--out",
                  store).exit_code == 0  # fmt: skip
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    write_shard(shards / "train-000002.tar", [{"__key__": "k01", "png": png(1), "cls": 0}])
    for command in (
        ["cache-teacher --temperature 2 --data", shards, "--teacher", teacher, "--out",
         tmp_path / "c2.zarr"],
        ["verify", store, "--data", shards],
    ):  # fmt: skip
        lines = error_lines(invoke(*command))
        assert len(lines) == 1 and "key k01 appears twice" in lines[0], lines
    assert not (tmp_path / "c2.zarr").exists()
    (shards / "train-000002.tar").unlink()
    edited = [{"__key__": f"k{i:02d}", "png": png(9 * i), "cls": i % 2} for i in range(3, 6)]
    write_shard(shards / "train-000001.tar", edited)
    lines = error_lines(invoke("verify", store, "--data", shards))
    assert len(lines) == 1 and f"the train shards of {shards} changed since" in lines[0], lines
    with pytest.raises(CacheMismatchError, match="changed since"):
        DistillationDataset(load_dataset(str(shards), "train"), store)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_pack_shards_refuses_what_it_cannot_pack_and_leaves_nothing(tmp_path: Path) -> None:
    folder = colour_folder(tmp_path / "imgs", {"train": 2})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    lines = error_lines(invoke("pack-shards", folder, "--out", taken))
    assert len(lines) == 1 and "exists and is not an empty folder" in lines[0], lines
    assert os.listdir(taken) == ["keep.txt"]
    (folder / "test").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "test" / "flat.png")  # an unlabeled split
    lines = error_lines(invoke("pack-shards", folder, "--out", tmp_path / "new"))
    assert len(lines) == 1 and "is unlabeled: a shard's sample needs a cls label" in lines[0]
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]  # nothing aside


# --- forged keys, a shard cut short, and the test split of a run -------------------------------


def test_keys_with_tabs_and_newlines_cannot_forge_other_shards(tmp_path: Path) -> None:
    """Keys holding a tab, a label, a digest and a newline made two different sets of
    samples join to the same ``KEY\\tLABEL\\tSHA\\n`` lines, and so one fingerprint."""
    first, second = png(10), png(200)
    forged = f"\t0\t{hashlib.sha256(first).hexdigest()}\n"
    sets = {"one": [("a", first), (f"b{forged}c", second)],
            "two": [(f"a{forged}b", first), ("c", second)]}  # fmt: skip
    prints, lines = {}, {}
    for name, samples in sets.items():
        root = small_shards(tmp_path / name, count=0)
        write_shard(root / "train-000000.tar",
                    [{"__key__": key, "png": data, "cls": 0} for key, data in samples])  # fmt: skip
        dataset = load_dataset(str(root), "train")
        lines[name] = "".join(f"{e.key}\t{e.label}\t{e.sha256}\n" for e in dataset.index.entries)
        prints[name] = dataset.fingerprint()["sha256"]
    assert lines["one"] == lines["two"] and prints["one"] != prints["two"]


def test_a_shard_cut_at_a_member_boundary_is_refused(tmp_path: Path) -> None:
    """A shard copied short: cut right after a sample's last member (no end-of-archive
    blocks) it used to read as 6 of its 20 samples; cut inside a header, the same."""
    root = small_shards(tmp_path / "cut", count=0)
    shard = write_shard(root / "train-000000.tar",
                        [{"__key__": f"k{i:02d}", "png": png(9 * i), "cls": i % 2}
                         for i in range(20)])  # fmt: skip
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[12].offset  # the 7th sample's first header: 6 whole samples before it
    for cut, where in ((boundary, "a member boundary"), (boundary + 100, "inside a header")):
        shard.write_bytes(whole[:cut])
        with pytest.raises(DatasetError, match=rf"train-000000\.tar is cut short: it stops at "
                           rf"byte {boundary}, after 6 sample"):  # fmt: skip
            load_dataset(str(root), "train")
        assert not (root / ".kdpipe-index-train.json").exists(), where
    shard.write_bytes(whole)
    assert len(load_dataset(str(root), "train")) == 20


def test_training_on_shards_scores_their_test_split(tmp_path: Path) -> None:
    """train-teacher on shards with test-*.tar: the test split is scored (it was "has no
    test/ folder", test accuracy nan); without test shards the run says so."""
    folder = colour_folder(tmp_path / "imgs", {"train": 6, "test": 3}, size=6)
    shards = tmp_path / "shards"
    assert invoke("pack-shards", folder, "--out", shards).exit_code == 0
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", shards, "--out",
                  tmp_path / "t")  # fmt: skip
    assert made.exit_code == 0 and "no test" not in made.output, made.output
    rows = (tmp_path / "t" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("test_accuracy")]) >= 0.0  # a number, not nan
    for test_shard in shards.glob("test-*.tar"):
        test_shard.unlink()
    made = invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", shards, "--out",
                  tmp_path / "t2")  # fmt: skip
    assert made.exit_code == 0 and "has no test shards (test-*.tar)" in made.output
