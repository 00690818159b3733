"""What a careless or hostile user tries (issue "nothing lost, nothing silently wrong").

Each test gives kdpipe one bad input and checks the one line it answers with, the exit
status, and, where something was already written, that every byte of it is still there.
"""

import fcntl
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cache, fails, invoke, snapshot, student
from kdpipe.base.distributed import SINGLE
from kdpipe.base.errors import UsageError
from kdpipe.cache import read_manifest
from kdpipe.cache.location import Location
from kdpipe.data.datasets import load_dataset
from kdpipe.models.runs import read_card
from kdpipe.models.teach import single_writer
from kdpipe.train import TrainConfig, resume_training, train_student
from PIL import Image


class Killed(Exception):
    pass


def unfinished_run(cache_path: Path, out: Path) -> None:
    """A 3-epoch student stopped after its first epoch (as a kill would leave it)."""

    def kill_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Killed

    config = TrainConfig(model="kd_mlp_30x2", data="synthetic", out=str(out), epochs=3,
                         cache=str(cache_path), alpha=0.5)  # fmt: skip
    with pytest.raises(Killed):
        train_student(config, log=kill_after_epoch_1)


# --- data lost or silently wrong -------------------------------------------------------------


def test_a_copied_or_moved_run_resumes_where_it_is(train_cache: Path, tmp_path: Path) -> None:
    original = tmp_path / "runA"
    unfinished_run(train_cache, original)
    before = snapshot(original)
    copy = tmp_path / "runCopy"
    shutil.copytree(original, copy)
    card = resume_training(copy)
    assert (copy / "model.json").is_file() and card.weights_sha256
    assert snapshot(original) == before  # the original is not the one finished
    moved = tmp_path / "runB"
    original.rename(moved)
    assert resume_training(moved).weights_sha256 == card.weights_sha256


def test_a_run_resumes_from_another_working_directory(
    train_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative --cache and --out: resumed from elsewhere, the inputs are found where the
    run started."""
    shutil.copytree(train_cache, tmp_path / "c.zarr")
    monkeypatch.chdir(tmp_path)
    unfinished_run(Path("c.zarr"), Path("run"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = invoke("train-student --resume", tmp_path / "run")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "run" / "model.json").is_file()


def test_an_output_that_is_an_input_is_refused(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "t"
    shutil.copytree(teacher_run, teacher)
    kept = snapshot(teacher)
    refused = cache(teacher, teacher, "--temperature 2 --overwrite")
    fails(refused, f"the output {teacher} is the input {teacher}: writing it would destroy")
    fails(cache(teacher, teacher / "inside.zarr"), "lies inside the input")
    fails(cache(teacher, tmp_path, "--temperature 2 --overwrite"), "holds the input")
    # the cache's own teacher, named as a student's output
    made = cache(teacher, tmp_path / "c.zarr")
    assert made.exit_code == 0, made.output
    kept_cache = snapshot(tmp_path / "c.zarr")
    fails(student(tmp_path / "c.zarr", teacher, "--alpha 0.5 --overwrite"), "is the input")
    fails(student(tmp_path / "c.zarr", tmp_path / "c.zarr", "--alpha 0.5 --overwrite"), "is the")
    assert snapshot(teacher) == kept and snapshot(tmp_path / "c.zarr") == kept_cache


def image_folder(root: Path, splits: dict[str, dict[str, int]], mode: str = "L") -> Path:
    """root/<split>/<class>/<i>.png, each class a flat shade, 10x10."""
    for split, classes in splits.items():
        for index, (name, count) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new(mode, (10, 10), 40 + 150 * index).save(root / split / name / f"{i}.png")
    return root


def teacher_on(folder: Path, out: Path) -> object:
    return invoke("train-teacher --model kd_mlp_30x2 --epochs 1 --data", folder, "--out", out)


def test_a_damaged_test_split_is_an_error_not_a_nan(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    truncated = folder / "test" / "b" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:20])
    fails(teacher_on(folder, tmp_path / "t1"), f"cannot read image {truncated}")
    assert not (tmp_path / "t1").exists()
    truncated.unlink()
    (folder / "test" / "c").mkdir()
    Image.new("L", (10, 10)).save(folder / "test" / "c" / "0.png")
    fails(teacher_on(folder, tmp_path / "t2"), "has classes not in")
    shutil.rmtree(folder / "test")
    made = teacher_on(folder, tmp_path / "t3")
    assert made.exit_code == 0 and "has no test/ folder: no test accuracy" in made.output


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    for split in ("train", "test"):
        for name, level in (("dark", 10_000), ("light", 50_000)):
            (root / split / name).mkdir(parents=True)
            pixels = np.full((8, 8), level, dtype=np.uint16)
            Image.fromarray(pixels).save(root / split / name / "0.png")
    assert Image.open(root / "train" / "dark" / "0.png").mode == "I;16"
    data = load_dataset(str(root), "train")
    assert data.images[0].unique().tolist() == [round(10_000 * 255 / 65535)]  # 39, not 255
    assert data.images[1].unique().tolist() == [round(50_000 * 255 / 65535)]


@pytest.mark.parametrize("value", ["1e-9", "inf", "nan", "5000"])
def test_extreme_temperatures_are_refused_up_front(
    teacher_run: Path, train_cache: Path, tmp_path: Path, value: str
) -> None:
    # a bad option value: click's exit status 2, the library's own sentence (kdpipe.base.checks)
    fails(cache(teacher_run, tmp_path / "c.zarr", f"--temperature {value}"),
          "--temperature must be a number from 0.01 to 1000", code=2)  # fmt: skip
    assert not (tmp_path / "c.zarr").exists()
    fails(student(train_cache, tmp_path / "s", f"--alpha 0.5 --temperature {value}"),
          "--temperature must be a number from 0.01 to 1000", code=2)  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_an_edited_model_card_is_noticed(teacher_run: Path, tmp_path: Path) -> None:
    """data_config.mean edited in model.json: every output would change; it is refused."""
    teacher = tmp_path / "t"
    shutil.copytree(teacher_run, teacher)
    card = json.loads((teacher / "model.json").read_text())
    card["data_config"]["mean"] = [0.9]
    (teacher / "model.json").write_text(json.dumps(card))
    fails(cache(teacher, tmp_path / "c.zarr"), "model.json was edited after training")
    assert not (tmp_path / "c.zarr").exists()


def test_a_model_card_with_an_impossible_input_size(teacher_run: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "t"
    shutil.copytree(teacher_run, teacher)
    card = json.loads((teacher / "model.json").read_text())
    card["data_config"]["input_size"] = [1, -1, 12]
    (teacher / "model.json").write_text(json.dumps(card))
    fails(cache(teacher, tmp_path / "c.zarr"), "data_config input_size [1, -1, 12] is not")


# --- one line instead of a traceback ---------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--opt sgdd", "--opt 'sgdd': timm cannot create this optimizer"),
        ("--sched cosinee", "--sched 'cosinee': timm cannot create this schedule"),
        ("--momentum -5", "--momentum must be in [0, 1), not -5"),
        ("--momentum nan", "--momentum must be in [0, 1), not nan"),
        ("--lr inf", "--lr must be a finite number > 0, not inf"),
        ("--hidden-sizes 8,8", "--hidden-sizes sets the layers of kd_mlp; kd_mlp_30x2 has"),
    ],
)
def test_bad_training_options_leave_nothing_behind(
    train_cache: Path, tmp_path: Path, options: str, message: str
) -> None:
    fails(student(train_cache, tmp_path / "s", f"--alpha 0.5 {options}"), message)
    assert not (tmp_path / "s").exists()  # nothing to clean up before the retry


def test_mix_alpha_inf_is_named(teacher_run: Path, tmp_path: Path) -> None:
    result = cache(
        teacher_run, tmp_path / "c.zarr", "--temperature 2 --views 2 --mix mixup --mix-alpha inf"
    )
    fails(result, "--mix-alpha must be a finite number > 0, not inf")


def test_a_second_writer_on_one_store_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    """Another cache-teacher holds the store: told to wait, not to --overwrite it."""
    out = tmp_path / "c.zarr"
    assert cache(teacher_run, out).exit_code == 0
    kept = snapshot(out)
    with open(tmp_path / ".c.zarr.lock", "a+") as held:  # as the live writer holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for options in ("--temperature 2", "--temperature 2 --overwrite"):
            fails(cache(teacher_run, out, options), "is being written by another cache-teacher")
    assert snapshot(out) == kept


def test_cache_teacher_leaves_no_lock_behind(teacher_run: Path, tmp_path: Path) -> None:
    """The writer's lock file goes with the pass: a finished cache, and a refused output
    (a folder of the user's, found by make faults' guard sweep: the refusal left
    ``.notes.lock`` beside it, and the folders made to hold it), leave nothing of it."""
    assert cache(teacher_run, tmp_path / "c.zarr").exit_code == 0
    assert not (tmp_path / ".c.zarr.lock").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("three years of work\n")
    kept = snapshot(tmp_path)
    fails(cache(teacher_run, notes), "already exists and is not a kdpipe cache to resume")
    fails(cache(teacher_run, notes / "thesis.txt"), "already exists and is not a kdpipe cache")
    assert snapshot(tmp_path) == kept and not (tmp_path / ".notes.lock").exists()
    # a pass that fails before writing anything takes away the folders made for the lock
    deep = Location(str(tmp_path / "new" / "deep" / "c.zarr"))
    with pytest.raises(UsageError), single_writer(deep, SINGLE):
        assert (tmp_path / "new" / "deep" / ".c.zarr.lock").exists()
        raise UsageError("refused inside the pass")
    assert not (tmp_path / "new").exists()


def test_weights_of_another_architecture_get_one_line(teacher_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "mlp"
    made = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 --out", other)
    assert made.exit_code == 0
    teacher = tmp_path / "t"
    shutil.copytree(teacher_run, teacher)
    shutil.copy(other / "model.safetensors", teacher / "model.safetensors")
    result = cache(teacher, tmp_path / "c.zarr")
    fails(result, "does not fit kd_cnn:")
    assert "weights of another architecture" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_full_disk_while_saving_weights(
    train_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def no_space(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    result = student(train_cache, tmp_path / "s")
    fails(result, "checkpoint-e1.safetensors: cannot write the weights (No space left on device")
    assert not (tmp_path / "s" / "model.json").exists()  # unfinished, resumable


def test_verify_recompute_without_its_inputs_is_a_usage_error(train_cache: Path) -> None:
    fails(invoke("verify", train_cache, "--recompute 5"), "--recompute needs --data")


def test_degenerate_datasets(tmp_path: Path) -> None:
    empty = image_folder(tmp_path / "e", {"train": {"a": 3, "b": 3}})
    (empty / "train" / "c").mkdir()
    fails(teacher_on(empty, tmp_path / "t1"), "train/c holds no images")
    single = image_folder(tmp_path / "s", {"train": {"only": 3}})
    fails(teacher_on(single, tmp_path / "t2"), "has a single class (only)")


def test_storage_top_k_zero_and_caches_on_a_missing_path(train_cache: Path) -> None:
    fails(invoke("storage", train_cache, "--top-k 0"), "every value must be an integer >= 1", 2)
    fails(invoke("caches", "/no/such/folder"), "/no/such/folder does not exist", 2)


def test_caches_takes_file_urls_and_keeps_counts_integers(
    train_cache: Path, tmp_path: Path
) -> None:
    shutil.copytree(train_cache, tmp_path / "good.zarr")
    result = invoke("caches", f"file://{tmp_path}", "--format json")
    assert result.exit_code == 0, result.output
    assert [row["samples"] for row in json.loads(result.output)] == [
        read_manifest(train_cache).num_samples
    ]
    shutil.copytree(train_cache, tmp_path / "bad.zarr")
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{")
    result = invoke("caches", tmp_path, "--format csv")
    assert result.exit_code == 0, result.output
    good = next(line for line in result.output.splitlines() if "good.zarr" in line)
    assert f",{read_manifest(train_cache).num_samples},1,5," in good  # not 600.0,1.0,5.0


def test_storage_default_top_k_fits_a_cache_of_five_classes(train_cache: Path) -> None:
    result = invoke("storage", train_cache)  # 5 classes: the default 1,2,3,5 failed on K = 5
    assert result.exit_code == 0, result.output
    assert "top-3" in result.output and "top-5" not in result.output
    fails(invoke("storage", train_cache, "--top-k 5"), "--top-k 5: K must be in 1..4")


def test_tune_bias_refuses_a_grid_too_large_to_try(train_cache: Path, tmp_path: Path) -> None:
    made = student(train_cache, tmp_path / "s", "--alpha 0.5 --val-fraction 0.2")
    assert made.exit_code == 0, made.output
    result = invoke("tune-bias", tmp_path / "s", "--data synthetic --classes 1",
                    "--max-bias 1e9 --step 1e-9")  # fmt: skip
    fails(result, "biases to try: at most 200,001")


def test_report_names_the_test_split_size_and_the_cache_chunking(
    teacher_run: Path, tmp_path: Path
) -> None:
    from kdpipe.tools.report import cache_command, collect, summarize, to_markdown

    made = cache(teacher_run, tmp_path / "c.zarr", "--temperature 2 --chunk-size 100")
    assert made.exit_code == 0
    assert "--chunk-size 100" in cache_command(tmp_path / "c.zarr")
    assert student(tmp_path / "c.zarr", tmp_path / "s").exit_code == 0
    table = to_markdown(summarize(collect([tmp_path / "s"])))
    assert "test errors (of 200)" in table and "10,000" not in table
    assert read_card(tmp_path / "s").lineage["cache_id"]
    assert os.path.isdir(tmp_path / "s")


def test_tables_and_reports_are_never_written_over_their_inputs(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    """The same rule for every command that writes: report, storage, evaluate, bench."""
    assert student(train_cache, tmp_path / "s").exit_code == 0
    run = snapshot(tmp_path / "s")
    fails(invoke("report", tmp_path / "s", "--csv", tmp_path / "s" / "metrics.csv"),
          "lies inside the input")  # fmt: skip
    fails(invoke("evaluate", tmp_path / "s", "--data synthetic --output",
                 tmp_path / "s" / "model.json"), "lies inside the input")  # fmt: skip
    assert snapshot(tmp_path / "s") == run
    kept = snapshot(train_cache)
    fails(invoke("storage", train_cache, "--csv", train_cache / "zarr.json"), "lies inside")
    assert snapshot(train_cache) == kept
    (tmp_path / "data").mkdir()
    fails(invoke("bench --data synthetic --data-root", tmp_path / "data", "--out",
                 tmp_path / "data"), "is the input")  # fmt: skip
    assert (tmp_path / "data").is_dir()


def test_infinite_sizes_and_biases_are_named(train_cache: Path, tmp_path: Path) -> None:
    """Cases of the same kinds as above, on other options: one line, not an OverflowError."""
    fails(student(train_cache, tmp_path / "s", "--alpha 0.5 --cache-memory infG"),
          "'infG' is not a size such as 512M or 2G", 2)  # fmt: skip
    assert not (tmp_path / "s").exists()
    made = student(train_cache, tmp_path / "v", "--alpha 0.5 --val-fraction 0.2")
    assert made.exit_code == 0, made.output
    result = invoke("tune-bias", tmp_path / "v", "--data synthetic --classes 1 --max-bias inf")
    fails(result, "--max-bias and --step must be finite numbers > 0, not inf and 0.1")


def same_size_png(path: Path, shade: int) -> None:
    """Rewrite ``path`` as a flat image of another shade whose PNG has the same byte size,
    its modification time put back: an edit the quick index check cannot see."""
    stat = path.stat()
    original = path.read_bytes()
    for other in range(256):
        if other == shade:
            continue
        Image.new("L", (10, 10), other).save(path)
        if path.stat().st_size == stat.st_size and path.read_bytes() != original:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            return
    raise AssertionError("no shade with a PNG of the same size")


def test_verify_rehash_sees_what_the_quick_index_check_cannot(tmp_path: Path) -> None:
    """Issue 24: a file edited with its size and mtime kept passed `verify --data`, and so
    did a hand-edited index entry (new size and mtime, old digest). --rehash reads every
    file again, names the ones that changed, and corrects the index."""
    folder = image_folder(tmp_path / "imgs", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    assert teacher_on(folder, tmp_path / "t").exit_code == 0
    store = tmp_path / "c.zarr"
    made = invoke("cache-teacher --temperature 2 --data", folder, "--teacher", tmp_path / "t",
                  "--out", store)  # fmt: skip
    assert made.exit_code == 0, made.output
    sound = invoke("verify", store, "--data", folder, "--rehash")
    assert sound.exit_code == 0, sound.output
    assert f"all 8 files of {folder / 'train'} read again" in sound.output

    # the case as found: a file's bytes changed, its size and mtime as they were
    same_size_png(folder / "train" / "a" / "1.png", shade=40)
    assert invoke("verify", store, "--data", folder).exit_code == 0  # the quick check is blind
    caught = invoke("verify", store, "--data", folder, "--rehash")
    assert caught.exit_code == 1
    assert (f"1 of 8 file(s) in {folder / 'train'} changed since they were indexed (size and "
            "modification time kept, or the index edited): a/1.png") in caught.output  # fmt: skip
    assert "dataset" in caught.output.splitlines()[-1]  # the fingerprint fails too
    # the index was corrected: the quick check now sees it as well
    assert invoke("verify", store, "--data", folder).exit_code == 1

    # one more of the class: an index entry edited to a changed file's size and mtime
    other = image_folder(tmp_path / "other", {"train": {"a": 4, "b": 4}})
    store2 = tmp_path / "c2.zarr"
    made = invoke("cache-teacher --temperature 2 --data", other, "--teacher", tmp_path / "t",
                  "--out", store2)  # fmt: skip
    assert made.exit_code == 0, made.output
    edited = other / "train" / "b" / "2.png"
    Image.new("L", (10, 10), 7).save(edited, optimize=False, compress_level=0)  # another size
    index_file = other / ".kdpipe-index-train.json"
    record = json.loads(index_file.read_text())
    (entry,) = [e for e in record["files"] if e["path"] == "b/2.png"]
    entry["size"], entry["mtime_ns"] = edited.stat().st_size, edited.stat().st_mtime_ns
    index_file.write_text(json.dumps(record))
    assert invoke("verify", store2, "--data", other).exit_code == 0  # the old digest trusted
    caught = invoke("verify", store2, "--data", other, "--rehash")
    assert caught.exit_code == 1 and "changed since they were indexed" in caught.output
    assert ": b/2.png" in caught.output
    fails(invoke("verify", store2, "--rehash"), "--rehash needs --data")


def test_verify_rehash_reads_every_shard_again(tmp_path: Path) -> None:
    """The same class on WebDataset shards: one sample's image bytes replaced inside a
    shard whose size and mtime are kept (the shard's stamp)."""
    folder = image_folder(tmp_path / "imgs", {"train": {"a": 3, "b": 3}})
    shards = tmp_path / "shards"
    assert invoke("pack-shards", folder, "--out", shards, "--shard-size 6").exit_code == 0
    assert teacher_on(shards, tmp_path / "t").exit_code == 0
    store = tmp_path / "c.zarr"
    made = invoke("cache-teacher --temperature 2 --data", shards, "--teacher", tmp_path / "t",
                  "--out", store)  # fmt: skip
    assert made.exit_code == 0, made.output
    samples = json.loads((shards / ".kdpipe-index-train.json").read_text())["shards"][0]["samples"]
    first = samples[0]
    tar = shards / first["shard"]
    stat = tar.stat()
    raw = bytearray(tar.read_bytes())
    start, end = first["offset"], first["offset"] + first["size"]
    for shade in range(256):  # another image whose PNG is as long: the tar's size is kept
        buffer = io.BytesIO()
        Image.new("L", (10, 10), shade).save(buffer, format="PNG")
        replacement = buffer.getvalue()
        if len(replacement) == first["size"] and replacement != raw[start:end]:
            break
    raw[start:end] = replacement
    tar.write_bytes(bytes(raw))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert invoke("verify", store, "--data", shards).exit_code == 0  # the stamp trusted
    caught = invoke("verify", store, "--data", shards, "--rehash")
    assert caught.exit_code == 1
    assert f"1 of 6 file(s) in the train shards of {shards} changed" in caught.output
    assert f"index edited): {first['key']}" in caught.output


def test_an_input_too_small_for_the_network_is_one_line(tmp_path: Path) -> None:
    """Issue 24: a folder of 1 x 1 images reached kd_cnn's pooling and ended in a traceback
    in the first epoch. Every model is tried once on its input size when it is built."""
    icons = tmp_path / "icons"
    for split in ("train", "test"):
        for index, name in enumerate("ab"):
            (icons / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (1, 1), 40 + 150 * index).save(icons / split / name / f"{i}.png")
    result = invoke("train-teacher --model kd_cnn --epochs 1 --data", icons, "--out",
                    tmp_path / "t1")  # fmt: skip
    fails(result, "kd_cnn cannot take a 1x1 input with 1 channel(s) (Given input size: (32x1x1)."
                  " Calculated output size: (32x0x0). Output size is too small): choose an "
                  "--image-size it accepts, or another --model")  # fmt: skip
    assert "Warning" not in result.output and not (tmp_path / "t1").exists()
    # the same class: --image-size too small for a CNN, a fixed-size network on 12 x 12
    folder = image_folder(tmp_path / "imgs", {"train": {"a": 3, "b": 3}})
    fails(invoke("train-teacher --model kd_cnn --epochs 1 --image-size 2 --data", folder,
                 "--out", tmp_path / "t2"), "kd_cnn cannot take a 2x2 input")  # fmt: skip
    fails(invoke("train-teacher --model vit_tiny_patch16_224 --epochs 1 --data synthetic --out",
                 tmp_path / "t3"), "vit_tiny_patch16_224 cannot take a 12x12 input with 1 "
                 "channel(s) (Input height (12) doesn't match model (224).)")  # fmt: skip
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()
