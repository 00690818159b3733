"""kdpipe's training loop against a textbook loop written here, and its schedule against
timm's: the same initial weights and batch order must give the same weights.

The reference writes out what ``train-student`` promises to do: seed, create the model,
channels_last; plain ``torch.optim.SGD`` (timm's ``sgd`` is Nesterov SGD); the epoch
order ``torch.randperm`` from a generator seeded with the seed; each batch normalised
by hand; the loss ``α·CE + (1 − α)·T²·KL`` from ``torch.nn.functional`` (not kdpipe's
``distillation_loss``); and the learning rate of update k set by hand from the cosine
formula with linear warm-up, counted in updates. With ``--clip-grad`` the reference calls
timm's own ``dispatch_clip_grad`` between backward and step; with ``--logit-standardize``
it z-scores both logits as Sun et al.'s ``normalize`` does before the temperature.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kdpipe.cache import load_soft_labels
from kdpipe.data.datasets import load_dataset
from kdpipe.models.registry import create_model
from kdpipe.models.runs import load_model
from kdpipe.train import TrainConfig, resume_training, train_student
from kdpipe.views.inputs import DataConfig
from timm.utils import dispatch_clip_grad
from torch.optim.optimizer import register_optimizer_step_pre_hook

SEED, LR, BATCH, EPOCHS, WARMUP = 3, 0.05, 64, 2, 1
MODEL = "kd_mlp_30x2"


class StepLrs:
    """The lr of every optimizer step taken while it is open (torch's global step hook)."""

    def __enter__(self) -> list[float]:
        self.lrs: list[float] = []
        self.handle = register_optimizer_step_pre_hook(
            lambda optimizer, *_: self.lrs.append(optimizer.param_groups[0]["lr"])
        )
        return self.lrs

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def kdpipe_run(cache: Path, out: Path, alpha: float, **options: object) -> tuple[dict, list]:
    """train-student's final weights and the lr of each of its steps."""
    config = TrainConfig(model=MODEL, data="synthetic", epochs=EPOCHS, batch_size=BATCH, lr=LR,
                         seed=SEED, warmup_epochs=WARMUP, cache=str(cache), alpha=alpha,
                         out=str(out), **options)  # fmt: skip
    with StepLrs() as lrs:
        train_student(config)
    model, _ = load_model(out, torch.device("cpu"))
    return model.state_dict(), lrs


def textbook_lr(update: int, updates_per_epoch: int) -> float:
    """Linear warm-up from lr/100 over WARMUP epochs of updates, then the cosine over the
    whole run's updates (timm's warm-up is not a prefix: the cosine counts from 0)."""
    start, warmup = LR * 0.01, WARMUP * updates_per_epoch
    if update < warmup:
        return start + update * (LR - start) / warmup
    return 0.5 * LR * (1 + math.cos(math.pi * update / (EPOCHS * updates_per_epoch)))


def sun_normalize(logits: torch.Tensor) -> torch.Tensor:
    """Sun et al. (2024)'s ``normalize``, as in their code."""
    mean = logits.mean(dim=-1, keepdims=True)
    stdv = logits.std(dim=-1, keepdims=True)
    return (logits - mean) / (1e-7 + stdv)


def reference_run(
    cache: Path, alpha: float, clip: tuple[float, str] | None = None, standardize: bool = False
) -> tuple[dict, list]:
    """The textbook loop: its final weights and the lr of each of its steps."""
    train_set = load_dataset("synthetic", "train")
    soft = load_soft_labels(cache)
    rows, labels, targets = soft.indices, soft.labels, soft.log_probs()[:, 0]
    temperature = soft.manifest.temperature
    mean, std = train_set.pixel_stats()
    torch.manual_seed(SEED)
    model = create_model(MODEL, num_classes=train_set.num_classes,
                         data_config=DataConfig(train_set.input_size, mean, std))  # fmt: skip
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    order_generator = torch.Generator().manual_seed(SEED)
    per_epoch = math.ceil(len(rows) / BATCH)
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    lrs, update = [], 0
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(rows), generator=order_generator)
        for start in range(0, len(rows), BATCH):
            batch = order[start : start + BATCH]
            x = (train_set.images[rows[batch]].float() / 255 - mean_t) / std_t
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, labels[batch])
            if alpha < 1:
                student_logits, log_teacher = logits, targets[batch]
                if standardize:
                    student_logits = sun_normalize(logits)
                    log_teacher = F.log_softmax(sun_normalize(log_teacher) / temperature, dim=-1)
                log_student = F.log_softmax(student_logits / temperature, dim=-1)
                kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
                loss = alpha * loss + (1 - alpha) * temperature**2 * kl
            for group in optimizer.param_groups:
                group["lr"] = textbook_lr(update, per_epoch)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                dispatch_clip_grad(model.parameters(), clip[0], mode=clip[1])
            optimizer.step()
            update += 1
    return model.state_dict(), lrs


@pytest.mark.parametrize("alpha", [1.0, 0.3], ids=["hard-labels", "distilled"])
def test_the_loop_matches_a_textbook_loop(train_cache: Path, tmp_path: Path, alpha: float) -> None:
    ours, our_lrs = kdpipe_run(train_cache, tmp_path / "run", alpha)
    theirs, their_lrs = reference_run(train_cache, alpha)
    assert len(our_lrs) == len(their_lrs) == EPOCHS * math.ceil(600 / BATCH)
    assert our_lrs == pytest.approx(their_lrs, rel=1e-12)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("value,mode", [(0.05, "norm"), (0.002, "value"), (0.01, "agc")])
def test_clip_grad_is_timms_dispatch_clip_grad(
    train_cache: Path, tmp_path: Path, value: float, mode: str
) -> None:
    """--clip-grad VALUE --clip-mode MODE: the textbook loop with timm's own clipping."""
    ours, _ = kdpipe_run(train_cache, tmp_path / "run", 0.3, clip_grad=value, clip_mode=mode)
    theirs, _ = reference_run(train_cache, 0.3, clip=(value, mode))
    unclipped, _ = reference_run(train_cache, 0.3)
    for name, value_ in ours.items():
        torch.testing.assert_close(value_, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(ours["head.weight"], unclipped["head.weight"], atol=1e-4)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["clip_grad"], config["clip_mode"]) == (value, mode)


def test_logit_standardize_is_sun_et_als_loss(train_cache: Path, tmp_path: Path) -> None:
    """--logit-standardize trains as Sun et al.'s loss written out; config.json records it."""
    ours, _ = kdpipe_run(train_cache, tmp_path / "run", 0.3, logit_standardize=True)
    theirs, _ = reference_run(train_cache, 0.3, standardize=True)
    plain, _ = reference_run(train_cache, 0.3)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(ours["head.weight"], plain["head.weight"], atol=1e-4)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["logit_standardize"]


def test_the_lr_of_each_update_is_timms(train_cache: Path, tmp_path: Path) -> None:
    """Per update (the default): update k runs at timm's ``_get_lr(k)``, warm-up counted in
    updates; per epoch: every update of epoch e runs at ``_get_lr(e - 1)``, the warm-up
    lr for all of epoch 1, then a jump."""
    per_epoch = math.ceil(600 / BATCH)
    for sched_on in ("update", "epoch"):
        config = TrainConfig(model=MODEL, data="synthetic", epochs=EPOCHS, lr=LR,
                             warmup_epochs=WARMUP, out="unused", sched_on=sched_on)  # fmt: skip
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        timm = config.create_scheduler(optimizer, per_epoch)
        _, lrs = kdpipe_run(train_cache, tmp_path / sched_on, 0.5, sched_on=sched_on)
        if sched_on == "update":
            expected = [timm._get_lr(k)[0] for k in range(EPOCHS * per_epoch)]
            textbook = [textbook_lr(k, per_epoch) for k in range(EPOCHS * per_epoch)]
            assert expected == pytest.approx(textbook, rel=1e-12)
        else:
            expected = [timm._get_lr(k // per_epoch)[0] for k in range(EPOCHS * per_epoch)]
        assert lrs == expected, sched_on
        assert lrs[0] == pytest.approx(LR * 0.01)
        # per epoch, the lr holds for a whole epoch (epoch 1: the warm-up lr); per update,
        # the warm-up climbs by one increment each update
        moves = [b - a for a, b in itertools.pairwise(lrs[:per_epoch])]
        increment = (LR - LR * 0.01) / (WARMUP * per_epoch)
        assert moves == pytest.approx([0.0 if sched_on == "epoch" else increment] * len(moves))
        saved = json.loads((tmp_path / sched_on / "config.json").read_text())
        assert saved["sched_on"] == sched_on
        steps = EPOCHS * (per_epoch if sched_on == "update" else 1)
        assert saved["resolved"]["schedule"]["steps"] == steps
        assert saved["resolved"]["schedule"]["updates_per_epoch"] == per_epoch


def test_a_run_saved_before_sched_on_resumes_per_epoch(train_cache: Path, tmp_path: Path) -> None:
    """A config.json without ``sched_on`` was written when schedules moved once per epoch:
    it resumes so, to the weights of an uninterrupted per-epoch run, and its rebuilt
    command says --sched-on epoch."""
    from kdpipe.tools.report import command_line

    settings = {"model": MODEL, "data": "synthetic", "epochs": 3, "warmup_epochs": 1,
                "cache": str(train_cache), "alpha": 0.5, "seed": SEED}  # fmt: skip
    per_epoch = train_student(TrainConfig(**settings, sched_on="epoch", out=str(tmp_path / "e")))
    per_update = train_student(TrainConfig(**settings, out=str(tmp_path / "u")))
    assert per_epoch.weights_sha256 != per_update.weights_sha256  # the choice matters

    def stop_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        train_student(TrainConfig(**settings, sched_on="epoch", out=str(old)), stop_after_epoch_1)
    saved = json.loads((old / "config.json").read_text())
    del saved["sched_on"]
    del saved["resolved"]["schedule"]
    (old / "config.json").write_text(json.dumps(saved))
    assert "--sched-on epoch" in command_line(saved)
    assert "--sched-on" not in command_line({**saved, "sched_on": "update"})
    assert resume_training(old).weights_sha256 == per_epoch.weights_sha256


def test_sched_on_is_checked_before_a_run_starts(tmp_path: Path) -> None:
    from kdpipe.base.errors import UsageError

    def config(**options: object) -> TrainConfig:
        return TrainConfig(model=MODEL, data="synthetic", epochs=2, out=str(tmp_path / "x"),
                           **options)  # fmt: skip

    with pytest.raises(UsageError, match="--sched-on must be one of update, epoch, not 'batch'"):
        config(sched_on="batch").validate()
    with pytest.raises(UsageError, match=r"stepped per update \(Plateau LR only supports step per"):
        config(sched="plateau").validate()  # timm's own refusal, before any file
    assert not (tmp_path / "x").exists()
