"""Detection students (issue 25, steps 4-6): the loss, the trainer over DetectBatch with its
hard-label and online sources, mAP, ONNX export and int8, and their commands."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fails, invoke, snapshot
from kdpipe.base.errors import CacheMismatchError, UsageError
from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder

if importlib.util.find_spec("ultralytics") is None:  # not imported: kdpipe's door does it
    pytest.skip("the detect extra: pip install 'kdpipe[detect]'", allow_module_level=True)

from kdpipe.tasks.detect.loss import DistillSettings, StudentLoss, box_term, class_term
from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
from kdpipe.tasks.detect.yolo import create_detector, with_loss_settings

SIZE = 64


@pytest.fixture(scope="module")
def detect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "set"
    build_detect_folder(out, {"train": 12, "val": 4, "test": 4}, source="synthetic",
                        recipe=DetectRecipe(), log=lambda line: None)  # fmt: skip
    return out / "data.yaml"


def _student(architecture: str = "yolo11n.yaml", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return with_loss_settings(create_detector(architecture, 5)).train()


def _batch(
    teacher: TeacherTargets | None = None, images: torch.Tensor | None = None
) -> DetectBatch:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return DetectBatch(images=images, batch_idx=torch.tensor([0.0, 1.0, 1.0]),
                       cls=torch.tensor([[1.0], [3.0], [0.0]]),
                       bboxes=torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.4, 0.2, 0.5],
                                            [0.7, 0.7, 0.3, 0.2]]), teacher=teacher)  # fmt: skip


def _targets(head: dict, score_shift: float = 0.0, box_shift: float = 0.0) -> TeacherTargets:
    return TeacherTargets.from_head({"scores": head["scores"].detach() + score_shift,
                                     "boxes": head["boxes"].detach() + box_shift})  # fmt: skip


def test_the_default_box_threshold_reaches_a_yolos_task_aligned_scores() -> None:
    """A trained YOLO scores its objects near IoU x score (make detect's teacher: 0.11
    anchors per view above 0.5, 3.69 above 0.1): a teacher whose best anchors score 0.3
    has its boxes distilled at the default threshold, and had none at the old 0.5."""
    model = _student()
    head = model(_batch().images)
    scores = torch.full_like(head["scores"], -8.0)  # background everywhere
    scores[:, 2, :5] = float(torch.logit(torch.tensor(0.3)))  # five anchors, one class, 0.3
    noise = torch.randn(head["boxes"].shape, generator=torch.Generator().manual_seed(3))
    teacher = TeacherTargets.from_head({"scores": scores, "boxes": head["boxes"].detach() + noise})
    default = DistillSettings().positive
    assert default == 0.1
    assert float(box_term(head["boxes"], teacher, 2.0, default)) > 0
    assert float(box_term(head["boxes"], teacher, 2.0, 0.5)) == 0


@pytest.mark.parametrize("architecture", ["yolo11n.yaml", "yolo26n.yaml"])
def test_the_loss_without_a_teacher_is_ultralytics_own(architecture: str) -> None:
    from ultralytics.utils.loss import E2ELoss, v8DetectionLoss

    model = _student(architecture)
    batch = _batch()
    preds = model(batch.images)
    ours, parts = StudentLoss(model)(preds, batch)
    theirs_fn = E2ELoss if architecture.startswith("yolo26") else v8DetectionLoss
    theirs, items = theirs_fn(model)(preds, batch.ultralytics_batch())
    assert torch.equal(ours, theirs.sum()) and float(ours.detach()) > 0
    assert set(parts) == {f"yolo_{k.removesuffix('_loss')}" for k in items}
    # an image with no objects is Ultralytics' background image, the same loss
    empty = dataclasses.replace(batch, batch_idx=torch.zeros(0), cls=torch.zeros(0, 1),
                                bboxes=torch.zeros(0, 4))  # fmt: skip
    assert torch.equal(StudentLoss(model)(preds, empty)[0],
                       theirs_fn(model)(preds, empty.ultralytics_batch())[0].sum())  # fmt: skip


def test_the_distillation_term_is_zero_at_agreement_and_grows_with_disagreement() -> None:
    model = _student()
    head = model(_batch().images)
    same = _targets(head)
    assert float(class_term(head["scores"], same, 2.0)) < 1e-6
    assert float(box_term(head["boxes"], same, 2.0, positive=0.0)) < 1e-6
    classes = [float(class_term(head["scores"], _targets(head, s), 2.0)) for s in (0.5, 2.0)]
    noise = torch.randn(head["boxes"].shape, generator=torch.Generator().manual_seed(2))
    boxes = [float(box_term(head["boxes"], _targets(head, box_shift=noise * s), 2.0, 0.0))
             for s in (0.5, 3.0)]  # fmt: skip
    assert 0 < classes[0] < classes[1] and 0 < boxes[0] < boxes[1]
    # the whole loss: the same student and teacher add nothing beyond alpha * Ultralytics'
    batch = _batch()
    settings = DistillSettings(alpha=0.25, positive=0.0)
    hard, _ = StudentLoss(model)(head, batch)
    total, parts = StudentLoss(model, settings)(head, dataclasses.replace(batch, teacher=same))
    torch.testing.assert_close(total, 0.25 * hard, atol=1e-5, rtol=0)
    assert parts["kd_class"] < 1e-6 and parts["kd_box"] < 1e-6
    # boxes apart by noise: a constant shift of every DFL logit is the same distribution
    apart, parts = StudentLoss(model, settings)(head, dataclasses.replace(
        batch, teacher=_targets(head, 1.0, noise)))  # fmt: skip
    assert float(apart) > float(total) and parts["kd_class"] > 0 and parts["kd_box"] > 0


def test_a_reg_max_one_student_learns_a_dfl_teachers_expected_distances() -> None:
    """YOLO26n (plain box values) under a YOLO11 teacher (DFL): L1 against the teacher's
    decoded distances, zero when the student gives exactly those."""
    teacher = _student("yolo11n.yaml")(_batch().images)
    targets = _targets(teacher)
    bins = torch.arange(16, dtype=torch.float32)
    b, _, a = teacher["boxes"].shape
    distances = (teacher["boxes"].detach().view(b, 4, 16, a).softmax(2) * bins[:, None]).sum(2)
    assert float(box_term(distances, targets, 2.0, 0.0)) < 1e-6
    assert float(box_term(distances + 1.0, targets, 2.0, 0.0)) == pytest.approx(1.0, abs=1e-4)


def test_a_student_on_another_grid_or_dfl_is_refused_with_the_reason() -> None:
    model = _student()
    batch = _batch()
    head = model(batch.images)
    teacher_at_96 = TeacherTargets.from_head({"scores": torch.zeros(2, 5, 189),
                                              "boxes": torch.zeros(2, 64, 189)})  # fmt: skip
    with pytest.raises(CacheMismatchError, match="84 anchors but the teacher's targets have 189"):
        StudentLoss(model, DistillSettings())(
            head, dataclasses.replace(batch, teacher=teacher_at_96)
        )
    with pytest.raises(CacheMismatchError, match="needs the teacher's strides and image size"):
        StudentLoss(model, DistillSettings())(
            head, dataclasses.replace(batch, teacher=teacher_at_96)
        )
    reg8 = TeacherTargets.from_head(
        {"scores": torch.zeros(2, 5, 84), "boxes": torch.zeros(2, 32, 84)}
    )
    with pytest.raises(CacheMismatchError, match="reg_max 16 but the teacher's has 8"):
        StudentLoss(model, DistillSettings())(head, dataclasses.replace(batch, teacher=reg8))
    classes3 = TeacherTargets.from_head(
        {"scores": torch.zeros(2, 3, 84), "boxes": torch.zeros(2, 64, 84)}
    )
    with pytest.raises(
        CacheMismatchError, match="predicts 5 classes but the teacher's targets have 3"
    ):
        StudentLoss(model, DistillSettings())(head, dataclasses.replace(batch, teacher=classes3))


# --- runs: hard labels and online ----------------------------------------------------------------


def _config(data: Path, out: Path, **changes: object):
    from kdpipe.tasks.detect.train import DetectStudentConfig

    base = dict(model="yolo11n.yaml", data=str(data), out=str(out), epochs=1, image_size=SIZE,
                batch_size=6, views=2, seed=3)  # fmt: skip
    return DetectStudentConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def hard_run(detect_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdpipe.tasks.detect.train import train_detection_student

    return train_detection_student(_config(detect_set, tmp_path_factory.mktemp("h") / "run"))


def test_a_hard_label_run_writes_its_run_directory_and_repeats_exactly(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.train import train_detection_student

    names = sorted(p.name for p in hard_run.iterdir())
    assert names == ["config.json", "metrics.csv", "model.json", "model.safetensors"]
    _, card = load_detection_run(hard_run)
    assert (
        card.kind == "student" and card.source["kind"] == "hard-labels" and card.image_size == SIZE
    )
    assert card.dataset["fingerprint"]["count"] == 12 and card.lineage == {}
    assert card.source["view_seed"] == 3  # the run's own seed, not told another
    header, row = (hard_run / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:5] == ["epoch", "seconds", "lr", "batches", "loss"]
    assert "yolo_box" in header and "kd_class" not in header and row.split(",")[3] == "2"
    again = train_detection_student(_config(detect_set, tmp_path / "again"))
    assert load_detection_run(again)[1].weights_sha256 == card.weights_sha256
    other = train_detection_student(_config(detect_set, tmp_path / "other", seed=4))
    assert load_detection_run(other)[1].weights_sha256 != card.weights_sha256


def test_an_online_run_distils_from_the_teacher_on_every_batch_and_repeats_exactly(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.train import train_detection_student

    # the hard-label run stands in for a teacher: what matters is that it runs on each batch
    config = _config(detect_set, tmp_path / "online", teacher=str(hard_run), image_size=None,
                     positive=0.0)  # fmt: skip
    first = train_detection_student(config)
    _, card = load_detection_run(first)
    teacher_card = load_detection_run(hard_run)[1]
    assert card.source["kind"] == "online" and card.image_size == SIZE  # the teacher's size
    assert card.lineage["teacher_weights_sha256"] == teacher_card.weights_sha256
    header, row = (first / "metrics.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(values["kd_class"]) > 0 and float(values["kd_box"]) > 0
    assert json.loads((first / "config.json").read_text())["kind"] == "online-student"
    second = train_detection_student(dataclasses.replace(config, out=str(tmp_path / "second")))
    assert load_detection_run(second)[1].weights_sha256 == card.weights_sha256


def test_an_online_student_on_another_grid_is_refused_before_anything_is_written(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    from kdpipe.tasks.detect.train import train_detection_student

    with pytest.raises(UsageError, match=r"at 96 px has 189 anchors .* gives 84 at 64 px"):
        train_detection_student(_config(detect_set, tmp_path / "s", teacher=str(hard_run),
                                        image_size=96))  # fmt: skip
    with pytest.raises(UsageError, match="needs the teacher's strides and image size"):
        train_detection_student(_config(detect_set, tmp_path / "s", teacher=str(hard_run),
                                        image_size=128))  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_a_students_optimizer_groups_and_warmup_are_ultralytics_trainers() -> None:
    """--opt auto against Ultralytics' own build_optimizer (its trainer's method, called on
    the two attributes it reads): the same optimizer, lr, momentum and parameter groups; then
    the warm-up's ends and middle."""
    from types import SimpleNamespace

    from kdpipe.tasks.detect.train import (
        Schedule,
        optimizer_choice,
        optimizer_for,
        warmup,
    )
    from ultralytics.engine.trainer import BaseTrainer

    model = _student()
    short = _config(Path("d.yaml"), Path("o"), epochs=20, batch_size=16)
    opt, lr, momentum = optimizer_choice(short, 5, rows=400)
    stub = SimpleNamespace(args=SimpleNamespace(lr0=0.01, optimizer="auto", warmup_bias_lr=0.1),
                           data={"nc": 5})  # fmt: skip
    theirs = BaseTrainer.build_optimizer(stub, model, "auto", 0.01, 0.937, 5e-4,
                                         iterations=20 * 7)  # fmt: skip
    ours = optimizer_for(model, opt, lr, momentum, 5e-4)
    assert (opt, type(ours), type(theirs)) == ("adamw", torch.optim.AdamW, torch.optim.AdamW)
    by_name = {g["param_group"]: g for g in theirs.param_groups}
    for group in ours.param_groups:
        other = by_name[{"norm": "bn"}.get(group["group"], group["group"])]
        trained = [id(p) for p in other["params"] if p.requires_grad]  # not DFL's fixed conv
        assert [id(p) for p in group["params"]] == trained
        assert (group["lr"], group["betas"], group["weight_decay"]) == (
            other["lr"], other["betas"], other["weight_decay"])  # fmt: skip
    long = dataclasses.replace(short, epochs=2000)
    assert optimizer_choice(long, 5, rows=400) == ("sgd", 0.01, 0.9)  # past 10,000 iterations
    sgd = dataclasses.replace(short, opt="sgd")
    assert optimizer_choice(sgd, 5, rows=400) == ("sgd", 0.01, 0.937)
    optimizer = optimizer_for(model, "sgd", 0.01, 0.937, 5e-4)
    schedule = Schedule.of(sgd, 0.01, 0.937, batches=25)
    assert schedule.warmup_steps == 75 and schedule.bias_lr == 0.1
    assert Schedule.of(dataclasses.replace(sgd, epochs=2), 0.01, 0.937, 25).warmup_steps == 25
    lrs = {}
    for step in (0, 30, 75):
        warmup(optimizer, step, 75, 0.008, 0.937, 0.1)
        lrs[step] = {g["group"]: (g["lr"], g["momentum"]) for g in optimizer.param_groups}
    assert lrs[0] == {"weight": (0.0, 0.8), "norm": (0.0, 0.8), "bias": (0.1, 0.8)}
    assert lrs[30]["weight"] == pytest.approx((0.008 * 0.4, 0.8 + 0.137 * 0.4))
    assert lrs[30]["bias"][0] == pytest.approx(0.1 + (0.008 - 0.1) * 0.4)
    assert set(lrs[75].values()) == {(0.008, 0.937)}


def test_a_student_saves_its_weights_average_which_does_not_change_its_training(
    detect_set: Path, hard_run: Path, tmp_path: Path
) -> None:
    """The saved weights are ModelEMA's (as Ultralytics' trainer saves): the same seed with
    --ema-decay 0 trains through the same losses and saves other weights, its last ones."""
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.train import train_detection_student

    last = train_detection_student(_config(detect_set, tmp_path / "last", ema_decay=0.0))
    averaged = load_detection_run(hard_run)[1]
    assert load_detection_run(last)[1].weights_sha256 != averaged.weights_sha256
    losses = [pd.read_csv(run / "metrics.csv").drop(columns="seconds") for run in (last, hard_run)]
    pd.testing.assert_frame_equal(*losses)


def test_the_weights_average_ramps_over_ema_tau_updates() -> None:
    """--ema-tau is ModelEMA's tau: after update n the average keeps decay * (1 - exp(-n /
    tau)) of itself. At Ultralytics' 2000 a short run's average is its last weights; a ramp
    of a tenth of the run averages its later updates."""
    import math

    from kdpipe.tasks.detect.train import average_of

    model = torch.nn.Linear(1, 1, bias=False)
    ends = {}
    for tau in (2000.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(0.0)
        ema, expected = average_of(model, 0.9999, tau), 0.0
        for n in range(1, 51):
            with torch.no_grad():
                model.weight.fill_(float(n))
            ema.update(model)
            keep = 0.9999 * (1 - math.exp(-n / tau))
            expected = keep * expected + (1 - keep) * n
        ends[tau] = float(ema.ema.weight)
        assert ends[tau] == pytest.approx(expected, rel=1e-6)
    assert ends[2000.0] > 49 and ends[5.0] < 46


def test_a_detection_student_saved_before_the_warmup_and_average_resumes_as_it_began(
    detect_set: Path, tmp_path: Path
) -> None:
    """A config.json written before --warmup-epochs, --ema-decay and --opt auto existed
    resumes with the recipe it started with (no warm-up, no average, SGD at 0.01), not with
    today's defaults."""

    from kdpipe.tasks.detect.runs import load_detection_run

    start = (f"train-student --data {detect_set} --model yolo11n.yaml --hard-labels --views 2 "
             f"--image-size {SIZE} --epochs 2 --batch-size 6 --seed 3 --opt sgd --lr 0.01 "
             "--momentum 0.937 --warmup-epochs 0 --ema-decay 0")  # fmt: skip
    whole = tmp_path / "whole"
    assert invoke(start, "--out", whole).exit_code == 0
    out = tmp_path / "old"
    killed = _killed_after_epoch_1(start, out)
    assert killed.returncode == -signal.SIGKILL and (out / "checkpoint.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    for key in ("warmup_epochs", "ema_decay"):
        del saved[key]  # as kdpipe wrote it before these existed
    (out / "config.json").write_text(json.dumps(saved))
    done = invoke("train-student --resume", out)
    assert done.exit_code == 0, done.output
    assert load_detection_run(out)[1].weights_sha256 == load_detection_run(whole)[1].weights_sha256


# --- the cached source ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def detect_cache(
    hard_run: Path, detect_set: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The hard-label run, standing in for a teacher, cached dense in float32 over the train
    split with the student's views and seed (2 and 3)."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    done = invoke("cache-teacher --teacher", hard_run, "--data", detect_set, "--out", out,
                  "--views 2 --seed 3 --chunk-size 5 --dtype float32 --device cpu")  # fmt: skip
    assert done.exit_code == 0, done.output
    return out


def test_a_cache_replays_the_online_students_pixels_and_teacher_outputs(
    hard_run: Path, detect_set: Path, detect_cache: Path
) -> None:
    from kdpipe.data.yolo import load_detection_split
    from kdpipe.tasks.detect.cache import DetectionCache
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.sources import CachedBatches, OnlineBatches, ViewBatches

    train = load_detection_split(detect_set, "train")
    teacher = load_detection_run(hard_run)[0].eval()
    online = OnlineBatches(ViewBatches(train, SIZE, 5, 2, 3), teacher, torch.device("cpu"))
    cached = CachedBatches(DetectionCache(detect_cache, train), 5, 3)
    for epoch in (1, 2):  # two epochs: every row in each of its two views
        pairs = list(zip(online.epoch(epoch), cached.epoch(epoch), strict=True))
        assert len(pairs) == 3
        for ran, read in pairs:
            assert torch.equal(ran.images, read.images) and torch.equal(ran.bboxes, read.bboxes)
            assert torch.equal(ran.cls, read.cls) and torch.equal(ran.batch_idx, read.batch_idx)
            assert read.teacher.stored.all()
            torch.testing.assert_close(read.teacher.scores, ran.teacher.scores, atol=1e-4, rtol=0)
            torch.testing.assert_close(read.teacher.boxes, ran.teacher.boxes, atol=1e-4, rtol=0)


def test_a_cache_read_at_random_decodes_each_chunk_once_unless_its_memory_is_smaller(
    hard_run: Path, detect_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A student draws rows at random: a reader that kept a few chunks decoded most of a
    cache per epoch once it had more chunks than that (1,600 canvases: an epoch 2x slower).
    By default every chunk is decoded once; --cache-memory bounds the chunks kept."""
    import kdpipe.tasks.detect.cache as module
    from kdpipe.tasks.detect.cache import DetectionCache

    detect_cache = tmp_path / "c.zarr"  # a chunk per row: 12 chunks per array
    done = invoke("cache-teacher --teacher", hard_run, "--data", detect_set, "--out",
                  detect_cache, "--views 2 --chunk-size 1 --device cpu")  # fmt: skip
    assert done.exit_code == 0, done.output
    decoded = []

    def counted(*args: object) -> np.ndarray:
        decoded.append(args[2:4])  # (array name, chunk index)
        return real(*args)

    real = module.read_chunk
    monkeypatch.setattr(module, "read_chunk", counted)
    order = np.random.default_rng(0).permutation(np.repeat(np.arange(12), 3))
    whole = DetectionCache(detect_cache, str(detect_set))
    expected = [whole.targets([(int(r), 1)]).scores for r in order]
    assert len(decoded) == len(set(decoded)) == 12 * 2  # scores and boxes, each chunk once
    chunk = whole._chunk("boxes", 0).nbytes  # the largest chunk's decoded bytes
    decoded.clear()
    small = DetectionCache(detect_cache, str(detect_set), memory=chunk)
    again = [small.targets([(int(r), 1)]).scores for r in order]
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))
    assert len(decoded) > 24 and small.decoded_bytes <= chunk  # re-read, within its budget
    done = invoke("train-student --model yolo11n.yaml --data", detect_set, "--hard-labels "
                  "--cache-memory 1M --epochs 1 --out", detect_set.parent / "x")  # fmt: skip
    fails(done, "--cache-memory does not apply to a hard-label detection student")


def test_a_hard_label_source_given_the_caches_view_seed_renders_the_caches_views(
    detect_set: Path, detect_cache: Path
) -> None:
    """A hard-label (or online) student of another seed than the cache's, told the cache's
    seed as its view seed, renders the cached student's pixels and boxes in the same order:
    the like-for-like reference. Without it, its views are its own seed's."""
    from kdpipe.data.yolo import load_detection_split
    from kdpipe.tasks.detect.cache import DetectionCache
    from kdpipe.tasks.detect.sources import CachedBatches, ViewBatches

    train = load_detection_split(detect_set, "train")
    cached = list(CachedBatches(DetectionCache(detect_cache, train), 5, 4).epoch(2))
    told = list(ViewBatches(train, SIZE, 5, 2, 4, view_seed=3).epoch(2))
    own = list(ViewBatches(train, SIZE, 5, 2, 4).epoch(2))
    for ran, read in zip(told, cached, strict=True):
        assert torch.equal(ran.images, read.images) and torch.equal(ran.bboxes, read.bboxes)
    assert not all(torch.equal(a.images, b.images) for a, b in zip(own, cached, strict=True))


def test_a_float32_cached_student_is_the_online_student_of_its_seed_and_views(
    hard_run: Path, detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    """Every arm of a seed on the cache's views: a student from the float32 cache ends with
    the weights of the online student whose teacher ran on every batch (the targets read,
    not computed); one of its own views' seed does not."""
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.train import train_detection_student

    def weights(name: str, **changes: object) -> str:
        config = _config(detect_set, tmp_path / name, seed=4, image_size=None, **changes)
        return load_detection_run(train_detection_student(config))[1].weights_sha256

    cached = weights("cached", cache=str(detect_cache))
    assert weights("online", teacher=str(hard_run), view_seed=3) == cached
    assert weights("own-views", teacher=str(hard_run)) != cached


def test_train_student_distils_a_detection_student_from_a_cache_without_its_teacher(
    hard_run: Path, detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    from kdpipe.cache import Location, open_complete
    from kdpipe.tasks.detect.runs import load_detection_run

    out = tmp_path / "cached"
    done = invoke("train-student --model yolo11n.yaml --data", detect_set, "--cache",
                  detect_cache, "--alpha 0.5 --temperature 2 --epochs 2 --batch-size 6 "
                  "--seed 3 --out", out)  # fmt: skip
    assert done.exit_code == 0, done.output
    manifest = open_complete(Location(detect_cache), detection=True)[0]
    assert f"detection student yolo11n.yaml from cache {manifest.cache_id}" in done.output
    _, card = load_detection_run(out)
    assert card.source["kind"] == "cache" and card.source["views"] == 2
    assert card.image_size == SIZE  # the cache's canvas
    assert card.lineage["cache_id"] == manifest.cache_id
    assert card.lineage["teacher_weights_sha256"] == load_detection_run(hard_run)[1].weights_sha256
    rows = (out / "metrics.csv").read_text().splitlines()
    values = dict(zip(rows[0].split(","), rows[2].split(","), strict=True))
    assert len(rows) == 3 and float(values["kd_class"]) > 0 and float(values["kd_box"]) >= 0


def _killed_after_epoch_1(command: str, out: Path):
    """``kdpipe COMMAND --out OUT`` in a child process that SIGKILLs itself once epoch 1's
    checkpoint is written (the test hook, not a timer), at this process's thread count:
    importing Ultralytics sets ``OMP_NUM_THREADS=1`` for children, and an epoch summed on
    other threads than the in-process runs it is compared with gives other bits."""
    import os
    import subprocess
    import sys

    environment = {**os.environ, "KDPIPE_TEST_KILL_AFTER": "epochs:1",
                   "OMP_NUM_THREADS": str(torch.get_num_threads())}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "kdpipe", *command.split(), "--out", str(out)],
                          capture_output=True, text=True, env=environment)  # fmt: skip


def test_a_killed_detection_student_resumes_to_the_uninterrupted_weights(
    detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    """SIGKILLed right after epoch 1's checkpoint (the test hook, not a timer), then
    ``--resume RUN_DIR``: the weights of the same run left alone. Once from the cache with a
    YOLO26 student (its one-to-many weight is a per-epoch schedule the resume must replay),
    once on hard labels."""

    from kdpipe.tasks.detect.runs import load_detection_run

    arms = {
        "cached": f"--model yolo26n.yaml --cache {detect_cache} --alpha 0.5 --temperature 2",
        "hard": f"--model yolo11n.yaml --hard-labels --views 2 --image-size {SIZE}",
    }
    for name, arm in arms.items():
        start = f"train-student --data {detect_set} {arm} --epochs 3 --batch-size 6 --seed 3"
        whole = tmp_path / f"{name}-whole"
        assert invoke(start, "--out", whole).exit_code == 0
        out = tmp_path / f"{name}-killed"
        killed = _killed_after_epoch_1(start, out)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert (out / "checkpoint.json").is_file() and not (out / "model.json").exists()
        fails(invoke("train-student --resume", out, "--epochs 4"),
              "--resume continues with RUN_DIR/config.json; drop --epochs", code=2)  # fmt: skip
        done = invoke("train-student --resume", out)
        assert done.exit_code == 0, done.output
        assert "resuming" in done.output and "after epoch 1 of 3" in done.output
        assert (load_detection_run(out)[1].weights_sha256
                == load_detection_run(whole)[1].weights_sha256)  # fmt: skip
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
        assert [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()] == [
            "epoch", "1", "2", "3"]  # fmt: skip
        fails(invoke("train-student --resume", out), "is finished (it has model.json)")


def test_a_cached_detection_student_refuses_what_does_not_match_before_writing(
    detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    start = (f"--model yolo11n.yaml --cache {detect_cache} --alpha 0.5 --epochs 1 "
             f"--out {tmp_path / 'x'}")  # fmt: skip
    data = f"--data {detect_set}"
    fails(invoke("train-student", data, start, "--temperature 2 --views 3"),
          "--views does not apply to a cached detection student")  # fmt: skip
    fails(invoke("train-student", data, start, "--temperature 2 --view-seed 0"),
          "--view-seed does not apply to a cached detection student")  # fmt: skip
    fails(invoke("train-student", data, start), "Missing option --temperature")
    fails(invoke("train-student", data, start, "--temperature 2 --image-size 96"),
          "at 96 px has 189 anchors")  # fmt: skip
    fails(invoke("train-student", data, start, "--temperature 2 --hard-labels"),
          "--cache, --alpha, --temperature does not apply to a hard-label")  # fmt: skip
    other = tmp_path / "other"
    build_detect_folder(other, {"train": 4, "val": 2, "test": 2}, source="synthetic",
                        recipe=DetectRecipe(), log=lambda line: None)  # fmt: skip
    fails(invoke("train-student --data", other / "data.yaml", start, "--temperature 2"),
          "other images or labels")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_a_detection_student_on_data_naming_the_classes_otherwise_is_refused(
    hard_run: Path, detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    """The same images and labels under a YAML that names the classes in another order: the
    teacher's and the cache's class ids would mean other garments, so both are refused."""
    import shutil

    import yaml

    renamed = tmp_path / "renamed"
    shutil.copytree(detect_set.parent, renamed)
    spec = yaml.safe_load((renamed / "data.yaml").read_text())
    names = [spec["names"][i] for i in sorted(spec["names"])]
    spec["names"] = dict(enumerate([names[1], names[0], *names[2:]]))
    (renamed / "data.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "x"
    start = f"--model yolo11n.yaml --data {renamed / 'data.yaml'} --epochs 1 --out {out}"
    fails(invoke("distill-online", start, "--teacher", hard_run, "--alpha 0.5 --temperature 2"),
          f"name the classes differently at 2 position(s) (the same names in another order): "
          f"class 0: {names[0]!r} vs {names[1]!r}")  # fmt: skip
    fails(invoke("train-student", start, "--cache", detect_cache, "--alpha 0.5 --temperature 2"),
          "name the classes differently at 2 position(s)")  # fmt: skip
    assert not out.exists()


# --- evaluation and export ---------------------------------------------------------------------


def test_map_of_the_ground_truth_itself_is_one_and_of_shifted_boxes_lower(detect_set: Path) -> None:
    """The metric on predictions made from the labels (an independent check of the plumbing:
    letterbox, NMS, matching, DetMetrics)."""
    from kdpipe.data.yolo import load_detection_split
    from kdpipe.tasks.detect.evaluate import mean_average_precision
    from kdpipe.tasks.detect.sources import plain_views

    split = load_detection_split(detect_set, "val")
    truth = plain_views(split, np.arange(len(split)), SIZE)

    def from_labels(shift: float):
        def predict(images: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(images), 4 + 5, 16)
            for n, (i, c, box) in enumerate(zip(truth.batch_idx.long(), truth.cls[:, 0].long(),
                                                truth.bboxes, strict=True)):  # fmt: skip
                out[i, :4, n] = box * SIZE + torch.tensor([shift * box[2] * SIZE, 0, 0, 0])
                out[i, 4 + c, n] = 0.9
            return out

        return predict

    classes = ["a", "b", "c", "d", "e"]
    exact = mean_average_precision(from_labels(0.0), detect_set, "val", SIZE, classes)
    assert exact["map50"] > 0.99 and exact["map50_95"] > 0.99 and exact["images"] == 4
    moved = mean_average_precision(from_labels(0.2), detect_set, "val", SIZE, classes)
    assert moved["map50"] > 0.99 and 0 < moved["map50_95"] < exact["map50_95"]


def test_the_one_to_one_heads_detections_are_scored_without_nms(detect_set: Path) -> None:
    """``end2end``: a ``(B, max_det, 6)`` batch of detections (x1 y1 x2 y2, score, class) is
    scored as it is, made from the labels: mAP 1, as the one-to-many layout is above."""
    from kdpipe.data.yolo import load_detection_split
    from kdpipe.tasks.detect.evaluate import mean_average_precision
    from kdpipe.tasks.detect.sources import plain_views
    from ultralytics.utils.ops import xywh2xyxy

    split = load_detection_split(detect_set, "val")
    truth = plain_views(split, np.arange(len(split)), SIZE)

    def predict(images: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(images), 300, 6)
        for n, (i, c, box) in enumerate(zip(truth.batch_idx.long(), truth.cls[:, 0],
                                            truth.bboxes, strict=True)):  # fmt: skip
            out[i, n] = torch.cat([xywh2xyxy(box) * SIZE, torch.tensor([0.9]), c[None]])
        return out

    classes = ["a", "b", "c", "d", "e"]
    scored = mean_average_precision(predict, detect_set, "val", SIZE, classes, end2end=True)
    assert scored["map50_95"] > 0.99 and scored["map50"] > 0.99


def test_evaluate_scores_the_head_it_is_told_and_refuses_a_head_that_is_not_there(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    """A YOLO26's one-to-many head silenced (every class logit -50) and its one-to-one head
    told every class is there (+10): each predictor gives the head it names, the one-to-one
    detections as Ultralytics' NMS-free layout (x1 y1 x2 y2, score, class), and nothing of
    the silenced head passes the validator's 0.001."""
    from kdpipe.tasks.detect.evaluate import head_predictor, mean_average_precision

    model = _student("yolo26n.yaml").eval()
    detect = model.model[-1]
    for heads, bias in ((detect.cv3, -50.0), (detect.one2one_cv3, 10.0)):
        for level in heads:
            torch.nn.init.zeros_(level[-1].weight)
            torch.nn.init.constant_(level[-1].bias, bias)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        many = head_predictor(model, "one2many")(images)
        one = head_predictor(model, "one2one")(images)
    assert many.shape == (2, 4 + 5, 84) and float(many[:, 4:].max()) < 1e-20
    assert one.shape == (2, 84, 6) and bool((one[..., 4] > 0.99).all())
    assert bool((one[..., 2] > one[..., 0]).all() and (one[..., 3] > one[..., 1]).all())
    silenced = mean_average_precision(head_predictor(model, "one2many"), detect_set, "val",
                                      SIZE, ["a", "b", "c", "d", "e"])  # fmt: skip
    assert silenced["recall"] == 0 and silenced["map50_95"] == 0
    fails(invoke("evaluate", hard_run, "--data", detect_set, "--head one2one"),
          "(yolo11n.yaml) has no one-to-one head: --head one2one is for end-to-end")  # fmt: skip
    fails(invoke("evaluate", hard_run, "--data", detect_set, "--head one2two"),
          "Invalid value for '--head'", code=2)  # fmt: skip


def test_evaluate_and_export_give_the_same_map_for_pytorch_and_onnx_and_int8_evaluates(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    from kdpipe.tasks.detect.evaluate import evaluate_detection
    from kdpipe.tasks.detect.export import export_detection

    torch_row = evaluate_detection(hard_run, detect_set, split="val", latency=False).iloc[0]
    fp32 = export_detection(hard_run, tmp_path / "fp32.onnx")
    assert fp32.record["task"] == "detect" and fp32.record["check"]["max_abs_difference"] < 1e-2
    onnx_row = evaluate_detection(fp32.path, detect_set, split="val").iloc[0]
    assert onnx_row["format"] == "onnx-fp32" and onnx_row["latency_ms"] > 0
    assert onnx_row["head"] == torch_row["head"] == "one2many"
    with pytest.raises(UsageError, match="an ONNX export, which holds the one-to-many head"):
        evaluate_detection(fp32.path, detect_set, split="val", head="one2one")
    for column in ("map50_95", "map50", "precision", "recall"):
        assert 0 <= torch_row[column] <= 1
        assert onnx_row[column] == pytest.approx(torch_row[column], abs=1e-3)
    int8 = export_detection(hard_run, tmp_path / "int8.onnx", int8=True, calibration_rows=4)
    assert int8.record["quantization"]["calibration"]["split"] == "train"
    assert int8.size_bytes < fp32.size_bytes / 2
    int8_row = evaluate_detection(int8.path, detect_set, split="val", latency=False).iloc[0]
    assert int8_row["format"] == "onnx-int8-ptq" and 0 <= int8_row["map50_95"] <= 1


# --- the commands --------------------------------------------------------------------------------


def test_the_commands_train_evaluate_and_export_a_detection_student(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    done = invoke("train-student --model yolo11n.yaml --data", detect_set, "--hard-labels "
                  "--epochs 1 --image-size 64 --batch-size 6 --views 2 --seed 3 --out",
                  out)  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "detection student yolo11n.yaml on hard labels" in done.output
    # the command line's run is the library's run of the same options
    assert (json.loads((out / "model.json").read_text())["weights_sha256"]
            == json.loads((hard_run / "model.json").read_text())["weights_sha256"])  # fmt: skip
    online = invoke("distill-online --model yolo11n.yaml --data", detect_set, "--teacher", out,
                    "--alpha 0.5 --temperature 2 --box-weight 2 --epochs 1 --batch-size 6 "
                    "--views 2 --out", tmp_path / "online")  # fmt: skip
    assert online.exit_code == 0, online.output
    report = invoke("evaluate", out, "--data", detect_set, "--split val --format json")
    assert report.exit_code == 0, report.output
    row = json.loads(report.output)[0]
    assert 0 <= row["map50_95"] <= 1 and row["split"] == "val"
    csv_file = tmp_path / "eval.csv"
    for _ in range(2):  # a detector's report is kdpipe's own: --overwrite replaces it (make detect)
        again = invoke("evaluate", out, "--data", detect_set, "--split val --format csv --output",
                       csv_file, "--overwrite")  # fmt: skip
        assert again.exit_code == 0, again.output
    exported = invoke("export", out, "--out", tmp_path / "s.onnx", "--check-rows 2")
    assert exported.exit_code == 0, exported.output
    assert "fp32" in exported.output


def test_detection_options_that_do_not_apply_are_one_line(
    hard_run: Path, detect_set: Path, teacher_run: Path, tmp_path: Path
) -> None:
    before = snapshot(detect_set.parent)
    start = f"--model yolo11n.yaml --data {detect_set} --epochs 1 --out {tmp_path / 'x'}"
    fails(invoke("train-student", start), "needs --cache (a detection cache")
    fails(invoke("train-student --hard-labels --alpha 0.5", start), "--alpha does not apply")
    fails(invoke("train-student --hard-labels --jitter 2", start), "--jitter does not apply")
    fails(invoke("distill-online --alpha 0.5", start), "Missing option --teacher, --temperature")
    fails(invoke("distill-online --alpha 0.5 --temperature 2 --teacher", hard_run, "--opt lamb",
                 start), "--opt for a detection student is one of auto, sgd, adamw")  # fmt: skip
    fails(invoke("train-student --model kd_mlp_30x2 --data synthetic --epochs 1 --alpha 1 "
                 "--cache c --out o --views 2"), "--views is for detection", 2)  # fmt: skip
    fails(invoke("train-student --hard-labels --lr 0.02", start),
          "--lr and --momentum need --opt sgd or --opt adamw: --opt auto")  # fmt: skip
    fails(invoke("train-student --model kd_mlp_30x2 --data synthetic --epochs 1 --alpha 1 "
                 "--cache c --out o --ema-decay 0.9"),
          "--ema-decay is for detection", 2)  # fmt: skip
    fails(invoke("train-student --model kd_mlp_30x2 --data synthetic --epochs 1 --alpha 1 "
                 "--cache c --out o --ema-tau 100"),
          "--ema-tau is for detection", 2)  # fmt: skip
    fails(invoke("train-student --hard-labels --ema-tau 0", start), "--ema-tau", 2)
    fails(invoke("evaluate", hard_run, "--data", detect_set, "--per-class"),
          "are for classification runs", code=2)  # fmt: skip
    fails(invoke("evaluate", teacher_run, "--data synthetic --head one2one"),
          "--head is for detection runs", code=2)  # fmt: skip
    assert not (tmp_path / "x").exists() and snapshot(detect_set.parent) == before


def test_make_detects_tables_come_from_the_runs_own_files(
    hard_run: Path, detect_set: Path, detect_cache: Path, tmp_path: Path
) -> None:
    """The folder `make detect` fills, in small: a hard-label and a cached student, a dense
    cache, their evaluations; the tables and goals read them and measure nothing."""
    import shutil

    from kdpipe.tasks.detect.results import detection_tables, goals, main
    from kdpipe.tasks.detect.train import train_detection_student

    folder = tmp_path / "detect"
    shutil.copytree(hard_run, folder / "yolo11n-hard-s3")
    shutil.copytree(hard_run, folder / "teacher")  # a teacher from kdpipe's loop: not a row
    shutil.copytree(detect_cache, folder / "dense.zarr")
    train_detection_student(_config(detect_set, folder / "yolo11n-dense-s3",
                                    cache=str(folder / "dense.zarr"), image_size=None))  # fmt: skip
    (folder / "eval").mkdir()
    for name in ("yolo11n-hard-s3", "yolo11n-dense-s3"):
        done = invoke("evaluate", folder / name, "--data", detect_set, "--split val --format "
                      "csv --output", folder / "eval" / f"{name}.csv")  # fmt: skip
        assert done.exit_code == 0, done.output
    runs, arms, caches = detection_tables(folder)
    assert sorted(runs["arm"]) == ["cached-dense", "hard"] and list(runs["seed"]) == [3, 3]
    for name, value in zip(runs["run"], runs["map50_95"], strict=True):
        assert value == pd.read_csv(folder / "eval" / f"{name}.csv")["map50_95"].iloc[0]
    assert list(arms["seeds"]) == [1, 1] and (runs["epochs"] == 1).all()
    record = caches.iloc[0]
    assert record["storage"] == "dense" and record["views"] == 2 and record["rows"] == 12
    stored = sum(p.stat().st_size for p in (folder / "dense.zarr").rglob("*") if p.is_file())
    assert record["bytes_per_view"] == stored / 24 and record["teacher_pass_s"] >= 0
    lines = goals(runs, caches)
    assert any(line.startswith("- yolo11n.yaml: cached KD - hard labels = ") for line in lines)
    assert any("cached epoch / hard-label epoch = " for line in lines)
    assert "map50_95_one2one" not in runs and "one-to-one" not in "\n".join(lines)
    # a YOLO26's runs are scored through its NMS-free head too (NAME.one2one.csv, `evaluate
    # --head one2one`): its figure goes into its own column and goal lines; the file's layout
    # is evaluate's, its figure set here to one that says which file was read
    for name, score in (("yolo11n-hard-s3", 0.02), ("yolo11n-dense-s3", 0.05)):
        row = pd.read_csv(folder / "eval" / f"{name}.csv").assign(map50_95=score, head="one2one")
        row.to_csv(folder / "eval" / f"{name}.one2one.csv", index=False)
    runs, arms, caches = detection_tables(folder)
    assert sorted(runs["map50_95_one2one"]) == [0.02, 0.05]
    assert sorted(arms["map50_95_one2one"]) == [0.02, 0.05]
    assert ("- yolo11n.yaml through its one-to-one (NMS-free) head: cached KD - hard labels = "
            "+3.00 mAP50-95 points (s3: +3.00)") in "\n".join(goals(runs, caches))  # fmt: skip
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept\n")
    main([str(folder), str(page)])
    text = page.read_text()
    assert text.startswith("# Results\n\nkept\n") and "<!-- kdpipe:detect:begin -->" in text
    assert "cached-dense" in text and "Goals (issue 25):" in text
    assert "(val split of the data YAML, as every row below)" in text  # the files' own split


def test_bench_detect_times_every_arm_side_by_side_and_refuses_what_it_cannot_time(
    hard_run: Path, detect_set: Path, tmp_path: Path
) -> None:
    """The hard-label run stands in for a teacher: D1-D3 for one student, every arm at the
    teacher's canvas, each ratio the two arms' own fastest epochs."""
    csv_file, page = tmp_path / "bench.csv", tmp_path / "bench.md"
    args = ("bench-detect --teacher", hard_run, "--data", detect_set, "--out",
            tmp_path / "work", "--views 2 --top-k 5 --epochs 2 --repeats 1 --batch-size 6",
            "--dtype float32", "--csv", csv_file, "--markdown", page)  # fmt: skip
    done = invoke(*args)
    assert done.exit_code == 0, done.output
    from kdpipe.cache import read_detection_manifest

    for cache in ("dense", "topk"):  # the caches in the dtype asked for, as make detect's
        assert read_detection_manifest(tmp_path / "work" / f"{cache}.zarr").dtype == "float32"
    table = pd.read_csv(csv_file).set_index("name")["value"]
    for arm in ("hard", "dense", "topk", "online"):
        assert table[f"yolo11n_{arm}_epoch_s"] > 0
    assert table["D2_yolo11n_dense"] == pytest.approx(
        table["yolo11n_dense_epoch_s"] / table["yolo11n_hard_epoch_s"]
    )
    assert table["D3_yolo11n"] == pytest.approx(
        table["yolo11n_online_epoch_s"] / table["yolo11n_dense_epoch_s"]
    )
    assert table["D1_topk_bytes_per_view"] < table["D1_dense_bytes_per_view"]
    for arm in ("hard", "dense", "topk", "online"):  # the cache's canvas, the teacher's
        config = json.loads((tmp_path / "work" / f"yolo11n-{arm}-0" / "config.json").read_text())
        assert config["image_size"] == SIZE, arm
    assert "<!-- kdpipe:bench-detect-cpu:begin -->" in page.read_text()
    fails(invoke(*args), "already exists")  # nothing replaced without --overwrite
    fails(invoke("bench-detect --teacher", hard_run, "--data", detect_set, "--out",
                 tmp_path / "w2", "--epochs 1"), "--epochs", code=2)  # fmt: skip
    assert not (tmp_path / "w2").exists()
