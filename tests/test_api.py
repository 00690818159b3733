"""The Python API (issue 17): the public surface, the cache and dataset over it, a loop of
one's own against train-student, the API page's examples and the example scripts, runs
watched in TensorBoard and MLflow, and the training-curves plot."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import kdpipe as kd
import pandas as pd
import pytest
import torch
from conftest import cache, invoke, student
from kdpipe.cache import StreamedSoftLabels, load_soft_labels, retemper, smallest_budget
from kdpipe.views.inputs import render
from kdpipe.views.policy import view_schedule
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

DOCS = Path(__file__).parents[1] / "docs"


@pytest.fixture(scope="module")
def train_set() -> kd.ImageSet:
    return kd.load_dataset("synthetic", "train")


@pytest.fixture(scope="module")
def samples(train_set: kd.ImageSet) -> torch.utils.data.TensorDataset:
    """The synthetic train split as a plain (image, label) dataset, as a user has one."""
    return torch.utils.data.TensorDataset(train_set.images, train_set.labels)


@pytest.fixture(scope="module")
def caches(teacher_run: Path, train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The session's plain cache, and caches with views (a transfer subset), mixup and top-k."""
    root = tmp_path_factory.mktemp("api-caches")
    made = {"plain": train_cache}
    options = {
        "views": "--temperature 4 --views 3 --augment shift-flip --subset 0.5 --chunk-size 64",
        "mixup": "--temperature 4 --views 2 --augment crop-flip --mix mixup --chunk-size 128",
        "top2": "--temperature 4 --top-k 2 --chunk-size 128",
        "test": "--split test --temperature 2",
    }
    for name, option in options.items():
        result = cache(teacher_run, root / f"{name}.zarr", option)
        assert result.exit_code == 0, result.output
        made[name] = root / f"{name}.zarr"
    return made


def test_the_public_surface_is_all_documented() -> None:
    """__all__ is the surface: each name resolves, has its own docstring and is on the
    API page; nothing else is exported, and importing kdpipe does not import torch."""
    assert set(kd.__all__) == {"__version__", *kd._SURFACE}
    page = (DOCS / "python-api.md").read_text()
    for name in kd._SURFACE:
        value = getattr(kd, name)
        doc = value.__doc__ or ""
        # a dataclass without a docstring gets "Name(field, ...)" from dataclasses
        assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"
        assert f"`{name}" in page, f"docs/python-api.md does not document {name}"
    with pytest.raises(AttributeError):
        kd.plan_run  # noqa: B018 (internal: not on the surface)
    light = subprocess.run(
        [sys.executable, "-c", "import sys, kdpipe; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert light.stdout.strip() == "False"


def test_the_api_pages_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of docs/python-api.md, in order, in an empty folder."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "python-api.md").read_text(),
                        flags=re.S | re.M)  # fmt: skip
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_md"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/python-api.md, block {number}", "exec"), namespace)
    assert namespace["kd"].weights_sha256(namespace["model"]) == namespace["student"].weights_sha256


def run_example(name: str, *args: str) -> float:
    path = DOCS / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_the_example_scripts_learn(caches: dict) -> None:
    """Each script of docs/examples trains a student from a cache well above chance (0.2)."""
    assert run_example("plain_loop", "--cache", str(caches["plain"]), "--epochs", "3") > 0.6
    # timm's style of loop, from a mixup cache of crops (the 5-field items)
    assert run_example("timm_loop", "--cache", str(caches["mixup"]), "--epochs", "3") > 0.6


def test_the_lightning_example_learns(caches: dict) -> None:
    pytest.importorskip(
        "lightning", reason="Lightning is an optional extra (pip install 'kdpipe[lightning]'), "
        "not installed: docs/examples/lightning_module.py is not run"
    )  # fmt: skip
    assert run_example("lightning_module", "--cache", str(caches["plain"]), "--epochs", "3") > 0.6


def test_open_cache_reads_what_the_cache_readers_read(caches: dict) -> None:
    reference = load_soft_labels(caches["views"])
    opened = kd.open_cache(caches["views"])
    assert (len(opened), opened.num_views, opened.num_classes) == (300, 3, 5)
    assert torch.equal(opened.indices, reference.indices)
    rows, views = torch.tensor([0, 7, 299, 7]), torch.tensor([2, 0, 1, 1])
    stored = reference.log_probs()[rows, views]
    assert torch.equal(opened.soft_targets(rows, views), stored)
    assert torch.equal(opened.soft_targets([5, 6], 1), reference.log_probs()[[5, 6], 1])
    assert torch.allclose(opened.soft_targets(rows, views, 2.0), retemper(stored, 4.0, 2.0))
    params, partners = opened.view_params(rows, views)
    assert torch.equal(params, reference.views[rows, views]) and bool((partners == -1).all())
    # streamed (three chunks of memory): the same values, at both temperatures
    streamed = kd.open_cache(caches["views"], memory=smallest_budget(reference.manifest))
    assert streamed.streamed and isinstance(streamed._soft, StreamedSoftLabels)
    assert torch.equal(streamed.soft_targets(rows, views), stored)
    assert torch.equal(
        streamed.soft_targets(rows, views, 2.0), opened.soft_targets(rows, views, 2.0)
    )


def test_a_top_k_cache_is_reconstructed_and_not_re_tempered(caches: dict, tmp_path: Path) -> None:
    top2 = kd.open_cache(caches["top2"])
    values = top2.soft_targets(torch.arange(10), 0)
    assert torch.equal(values, load_soft_labels(caches["top2"]).log_probs()[:10, 0])
    assert torch.allclose(values.exp().sum(-1), torch.ones(10), atol=1e-2)
    assert torch.equal(top2.soft_targets([0], 0, temperature=4.0), values[:1])  # its own T
    with pytest.raises(kd.KdpipeError) as refused:
        top2.soft_targets([0], 0, temperature=2.0)
    cli = student(caches["top2"], tmp_path / "s", "--alpha 0.5 --temperature 2")
    assert cli.exit_code == 1 and f"Error: {refused.value}" in cli.output
    assert "cannot be re-tempered to T=2 exactly" in str(refused.value)


def test_the_dataset_replays_each_rows_stored_view(
    caches: dict, samples: torch.utils.data.TensorDataset, train_set: kd.ImageSet
) -> None:
    """Item r: sample indices[r] in the view the schedule gives row r in that epoch."""
    opened = kd.open_cache(caches["views"])
    dataset = kd.DistillationDataset(samples, opened, seed=3)
    assert len(dataset) == 300 and dataset.temperature == 4.0
    config = dataset.data_config
    assert config.input_size == (1, 12, 12) and (config.mean, config.std) == train_set.pixel_stats()
    for epoch in (1, 2, 5):
        dataset.set_epoch(epoch)
        chosen = view_schedule(300, 3, 3, epoch)
        for row in (0, 1, 150, 299):
            image, label, soft_target = dataset[row]
            index = int(opened.indices[row])
            params, _ = opened.view_params([row], chosen[row])
            expected = config.normalize(render(train_set.images[index : index + 1], params, None,
                                               (12, 12)))  # fmt: skip
            assert torch.equal(image, expected[0])
            assert int(label) == int(train_set.labels[index])
            assert torch.equal(soft_target, opened.soft_targets([row], chosen[row])[0])
    assert not torch.equal(view_schedule(300, 3, 3, 1), view_schedule(300, 3, 3, 2))
    batch = torch.tensor([299, 0, 7, 7, 150])  # a batch's positions: the schedule's rows
    assert torch.equal(view_schedule(300, 3, 3, 2, batch), view_schedule(300, 3, 3, 2)[batch])
    fixed = kd.DistillationDataset(samples, opened, view=2, temperature=2.0)
    fixed.set_epoch(7)
    assert torch.equal(fixed[10][2], opened.soft_targets([10], 2, 2.0)[0])
    with pytest.raises(kd.KdpipeError, match=r"holds views 0\.\.2"):
        kd.DistillationDataset(samples, opened, view=3)


def stacked_items(dataset: kd.DistillationDataset, rows: torch.Tensor) -> list[torch.Tensor]:
    """The items of ``rows``, one at a time, stacked field by field."""
    items = [dataset[int(row)] for row in rows]
    return [torch.stack([torch.as_tensor(item[f]) for item in items]) for f in range(len(items[0]))]


@pytest.mark.parametrize("name", ["plain", "views", "mixup"])
def test_batches_are_the_items_stacked_in_train_students_order(
    caches: dict, samples: torch.utils.data.TensorDataset, name: str
) -> None:
    """batches(): each batch is the items of its rows (views rendered together differ by
    float rounding only), the rows a torch.randperm from the generator, every row once."""
    opened = kd.open_cache(caches[name])
    dataset = kd.DistillationDataset(samples, opened, seed=3)
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch))
        batches = list(dataset.batches(64, generator=torch.Generator().manual_seed(epoch)))
        assert [len(b[0]) for b in batches[:-1]] == [64] * (len(batches) - 1)
        assert sum(len(b[0]) for b in batches) == len(dataset)
        for index in (0, len(batches) - 1):
            batch = batches[index]
            expected = stacked_items(dataset, order[index * 64 : (index + 1) * 64])
            assert len(batch) == len(expected) == (5 if name == "mixup" else 3)
            torch.testing.assert_close(batch[0], expected[0], atol=1e-5, rtol=0)
            for ours, theirs in zip(batch[1:], expected[1:], strict=True):
                assert torch.equal(ours, theirs.to(ours.dtype))
    in_order = next(dataset.batches(10, shuffle=False))
    assert torch.equal(in_order[1], stacked_items(dataset, torch.arange(10))[1])


def test_batches_from_a_streamed_cache_and_their_refusals(
    tmp_path: Path, samples: torch.utils.data.TensorDataset, caches: dict
) -> None:
    """A streamed cache gives whole chunks, each row once, each batch equal to its items;
    a fixed view and a bad batch size are refused by name."""
    reference = load_soft_labels(caches["views"])
    streamed = kd.open_cache(caches["views"], memory=smallest_budget(reference.manifest))
    assert streamed.streamed
    dataset = kd.DistillationDataset(samples, streamed, seed=1)
    every = reference.log_probs()[torch.arange(len(dataset)), view_schedule(len(dataset), 3, 1, 1)]
    seen = []
    for images, labels, targets in dataset.batches(32, workers=1):
        # the rows of a batch are found by their soft targets: unique per row here
        rows = [int(torch.nonzero((every == t).all(-1))[0]) for t in targets[:2]]
        expected = stacked_items(dataset, torch.tensor(rows))
        torch.testing.assert_close(images[:2], expected[0], atol=1e-5, rtol=0)
        assert torch.equal(labels[:2], expected[1])
        seen.append(len(images))
    assert sum(seen) == len(dataset)
    fixed = kd.DistillationDataset(samples, caches["views"], view=1)
    with pytest.raises(kd.KdpipeError, match="fixes view 1: iterate its items instead"):
        next(fixed.batches(8))
    with pytest.raises(kd.KdpipeError, match="batch_size must be a positive integer, not 0"):
        next(dataset.batches(0))


def test_the_dataset_takes_pil_images_and_refuses_transformed_ones(
    caches: dict, samples: torch.utils.data.TensorDataset, train_set: kd.ImageSet
) -> None:
    as_pil = [(Image.fromarray(image[0].numpy(), mode="L"), int(label)) for image, label in samples]
    from_pil = kd.DistillationDataset(as_pil, caches["mixup"])
    from_tensors = kd.DistillationDataset(samples, caches["mixup"])
    for row in (0, 333):
        ours, theirs = from_pil[row], from_tensors[row]
        assert len(ours) == 5  # a mixup cache: partner label and mix weight too
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                   for a, b in zip(ours, theirs, strict=True))  # fmt: skip
        assert float(ours[4]) < 1.0
    floats = [(image.float() / 255, label) for image, label in samples]
    with pytest.raises(kd.KdpipeError, match=r"sample 0: the image is a torch\.float32 tensor"):
        kd.DistillationDataset(floats, caches["plain"])


def test_the_dataset_refuses_another_dataset_with_the_clis_message(
    caches: dict, samples: torch.utils.data.TensorDataset, tmp_path: Path
) -> None:
    """A test-split cache given the train split: the same message as train-student's."""
    cli = student(caches["test"], tmp_path / "s")
    assert cli.exit_code == 1
    with pytest.raises(kd.KdpipeError) as refused:
        kd.DistillationDataset(samples, caches["test"], name="synthetic", split="train")
    assert f"Error: {refused.value}\n" in cli.output
    assert "count 200 (cache) != 600 (data)" in str(refused.value)
    images, labels = samples.tensors
    reordered = torch.utils.data.TensorDataset(images.roll(1, 0), labels.roll(1, 0))
    with pytest.raises(kd.KdpipeError, match=r"another dataset than TensorDataset train: sha256"):
        kd.DistillationDataset(reordered, caches["plain"])


def hand_written_student(cache_path: Path, samples: torch.utils.data.Dataset, **settings) -> str:
    """train-student's run, replayed through the public dataset and loss; its weights hash."""
    seed, epochs, lr, alpha = settings["seed"], settings["epochs"], settings["lr"], 0.5
    dataset = kd.DistillationDataset(samples, cache_path, seed=seed)
    torch.manual_seed(seed)
    model = kd.create_model("kd_mlp_30x2", num_classes=5, data_config=dataset.data_config)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=lr, weight_decay=0.0, momentum=0.9)
    updates_per_epoch = -(-len(dataset) // 128)  # the schedule counts updates (sched_on)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs,
                                       warmup_epochs=1, warmup_lr=lr * 0.01,
                                       step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)  # fmt: skip
    generator, updates = torch.Generator().manual_seed(seed), 0
    for epoch in range(1, epochs + 1):
        model.train()
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=128, sampler=order.tolist()):
            images, labels, targets, *mixed = batch
            logits = model(images.contiguous(memory_format=torch.channels_last)).float()
            loss = kd.distillation_loss(logits, labels, targets, alpha=alpha,
                                        temperature=dataset.temperature,
                                        partner_labels=mixed[0] if mixed else None,
                                        lam=mixed[1] if mixed else None)["loss"]  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
    return kd.weights_sha256(model)


@pytest.mark.parametrize("which", ["plain", "views", "mixup"])
def test_a_hand_written_loop_trains_train_students_weights(
    which: str, caches: dict, samples: torch.utils.data.TensorDataset, tmp_path: Path
) -> None:
    """The acceptance test: the same weights hash as train-student, same seed and settings
    (a fixed cache; 3 shift-flip views of a half transfer set; crops mixed with mixup)."""
    settings = {"seed": 2, "epochs": 2, "lr": 0.05}
    card = kd.train_student(
        kd.TrainConfig(model="kd_mlp_30x2", data="synthetic", cache=str(caches[which]),
                       alpha=0.5, batch_size=128, warmup_epochs=1, out=str(tmp_path / "run"),
                       **settings)
    )  # fmt: skip
    assert hand_written_student(caches[which], samples, **settings) == card.weights_sha256


def interrupted_after(epoch: int):
    """A log that stops a run after epoch ``epoch``'s checkpoint, as a kill would."""

    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch}/"):
            raise KeyboardInterrupt

    return log


def metrics_of(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").set_index("epoch")


def test_a_run_is_watched_in_tensorboard_with_the_numbers_of_metrics_csv(
    caches: dict, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "tb"
    result = student(
        caches["plain"], run, "--alpha 0.5 --epochs 3 --eval-every 2 --log tensorboard"
    )
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run))
    events.Reload()
    metrics = metrics_of(run)
    for column in ("lr", "loss", "hard_loss", "soft_loss", "train_accuracy", "test_errors"):
        scalars = {event.step: event.value for event in events.Scalars(column)}
        expected = metrics[column].dropna()  # epoch 1 was not evaluated: no test scalars
        assert sorted(scalars) == list(expected.index), column
        assert all(math.isclose(scalars[e], v, rel_tol=1e-6) for e, v in expected.items()), column
    assert sorted(e.step for e in events.Scalars("test_accuracy")) == [2, 3]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    lineage = json.loads((run / "model.json").read_text())["lineage"]
    assert hparams["lineage.cache_id"].string_value == lineage["cache_id"]
    assert hparams["lineage.teacher_id"].string_value == lineage["teacher_id"]
    assert hparams["alpha"].number_value == 0.5


def test_a_run_is_watched_in_mlflow_and_a_resumed_run_continues_it(
    caches: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    run = tmp_path / "ml"
    config = kd.TrainConfig(model="kd_mlp_30x2", data="synthetic", epochs=3, seed=1,
                            cache=str(caches["views"]), alpha=0.5, out=str(run),
                            log="mlflow")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        kd.train_student(config, log=interrupted_after(2))
    from kdpipe.train import resume_training

    card = resume_training(run)
    uri = (run / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow's own reader, at the run's store
    found = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    assert len(found) == 1 and found[0].info.status == "FINISHED"  # one run, continued
    params = found[0].data.params
    assert params["lineage.cache_id"] == card.lineage["cache_id"]
    assert params["lineage.teacher_id"] == card.lineage["teacher_id"]
    assert (params["kind"], params["model"], params["seed"]) == ("student", "kd_mlp_30x2", "1")
    client = MlflowClient(tracking_uri=uri)
    metrics = metrics_of(run)
    for column in ("loss", "soft_loss", "test_errors", "test_accuracy", "lr"):
        history = {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, column)}
        assert history == metrics[column].to_dict(), column


def test_a_run_saved_before_log_existed_resumes(caches: dict, tmp_path: Path) -> None:
    """config.json is read back strictly: one without log and log_dir still resumes, and
    ends where an uninterrupted run ends."""
    settings = {"model": "kd_mlp_30x2", "data": "synthetic", "epochs": 3,
                "cache": str(caches["plain"]), "alpha": 0.5}  # fmt: skip
    whole = kd.train_student(kd.TrainConfig(**settings, out=str(tmp_path / "whole")))
    run = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        kd.train_student(kd.TrainConfig(**settings, out=str(run)), log=interrupted_after(1))
    saved = json.loads((run / "config.json").read_text())
    del saved["log"], saved["log_dir"]
    (run / "config.json").write_text(json.dumps(saved))
    from kdpipe.train import resume_training

    assert resume_training(run).weights_sha256 == whole.weights_sha256


def test_log_options_are_checked_before_a_run_starts(caches: dict, tmp_path: Path) -> None:
    result = student(caches["plain"], tmp_path / "a", "--alpha 0.5 --log-dir somewhere")
    assert result.exit_code == 1 and "--log-dir says where --log tensorboard" in result.output
    assert not (tmp_path / "a").exists()
    result = student(caches["plain"], tmp_path / "b", "--alpha 0.5 --log wandb")
    assert result.exit_code == 2 and "'wandb' is not one of" in result.output
    with pytest.raises(kd.KdpipeError, match="--log must be one of none, tensorboard, mlflow"):
        kd.TrainConfig(model="m", data="synthetic", out="x", epochs=1, log="wandb").validate()


def test_report_plots_training_curves_per_group(caches: dict, tmp_path: Path) -> None:
    """One panel per metric some run has (test errors, loss, CE, KL); a hard-label group
    alone has no KL panel. The Markdown section links the figure."""
    from matplotlib.image import imread

    for seed in (0, 1):
        assert (
            student(
                caches["plain"], tmp_path / f"soft-s{seed}", f"--alpha 0.5 --seed {seed}"
            ).exit_code
            == 0
        )
        assert (
            student(
                caches["plain"], tmp_path / f"hard-s{seed}", f"--alpha 1 --seed {seed}"
            ).exit_code
            == 0
        )
    everything = invoke("report", *sorted(tmp_path.glob("*-s*")), "--plot", tmp_path / "all.png",
                        "--markdown", tmp_path / "results.md")  # fmt: skip
    assert everything.exit_code == 0, everything.output
    hard = invoke(
        "report", tmp_path / "hard-s0", tmp_path / "hard-s1", "--plot", tmp_path / "hard.png"
    )
    assert hard.exit_code == 0, hard.output
    widths = {name: imread(tmp_path / f"{name}.png").shape[1] for name in ("all", "hard")}
    assert widths == {"all": round(4 * 4.2 * 110), "hard": round(3 * 4.2 * 110)}
    assert (
        "![training curves: test errors and loss terms against the epoch](all.png)"
        in (tmp_path / "results.md").read_text()
    )
    from kdpipe.tools.report import training_curves

    curves = training_curves([tmp_path / "soft-s0", tmp_path / "soft-s1"])
    assert len(curves) == 4 and set(curves["group"]) == {"soft"}
    assert curves["loss"].tolist() == [*metrics_of(tmp_path / "soft-s0")["loss"],
                                       *metrics_of(tmp_path / "soft-s1")["loss"]]  # fmt: skip


def test_cached_layers_are_read_per_row_and_view_or_refused_in_one_line(
    teacher_run: Path, tmp_path: Path
) -> None:
    from kdpipe.cache import decoded_bytes, load_soft_labels, read_manifest

    out = tmp_path / "layers.zarr"
    made = cache(
        teacher_run,
        out,
        "--temperature 2 --views 2 --augment crop-flip --features 1 --chunk-size 64",
    )
    assert made.exit_code == 0, made.output
    opened = kd.open_cache(out)
    assert [(x.name, x.kind) for x in opened.layers] == [("features.7", "features")]
    rows, views = torch.tensor([3, 0, 7]), torch.tensor([1, 0, 1])
    stored = load_soft_labels(out).features["feature_features.7"]
    assert torch.equal(opened.layer_targets("features.7", rows, views),
                       stored[rows, views].float())  # fmt: skip
    with pytest.raises(kd.KdpipeError, match=r"no cached attention of layer 'features.7'; it "
                       r"has features.7 \(features\)"):  # fmt: skip
        opened.layer_targets("features.7", rows, 0, kind="attention")
    with pytest.raises(kd.KdpipeError, match="cached layers are read whole"):
        kd.open_cache(out, memory=decoded_bytes(read_manifest(out)) - 1).layer_targets(
            "features.7", rows, 0
        )


@pytest.mark.parametrize(
    "temperature,shown", [(0, "0"), (float("nan"), "nan"), (-2.0, "-2.0"), (5000.0, "5000.0")]
)
def test_the_api_refuses_the_temperatures_the_cli_refuses(
    train_cache: Path, tmp_path: Path, temperature: float, shown: str
) -> None:
    from kdpipe.base.errors import UsageError

    message = f"--temperature must be a number from 0.01 to 1000, not {shown}"
    opened = kd.open_cache(train_cache)
    with pytest.raises(UsageError) as raised:  # was ZeroDivisionError at 0, NaN targets at nan
        opened.soft_targets([0, 1], 0, temperature=temperature)
    assert str(raised.value) == message
    with pytest.raises(UsageError, match=re.escape(message)):
        kd.DistillationDataset(kd.load_dataset("synthetic", "train"), opened,
                               temperature=temperature)  # fmt: skip
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(UsageError) as raised:
        kd.distillation_loss(logits, labels, torch.log_softmax(logits, -1), alpha=0.5,
                             temperature=temperature)  # fmt: skip
    assert str(raised.value) == message
    # the command line's refusal is the same sentence, from the same check
    result = student(train_cache, tmp_path / "s", f"--alpha 0.5 --temperature {temperature}")
    said = f"--temperature must be a number from 0.01 to 1000, not {float(temperature)}"
    assert result.exit_code == 2 and said in result.output, result.output


@pytest.mark.parametrize("alpha", [2.0, -0.5, float("nan")])
def test_the_loss_refuses_a_weight_outside_zero_one(
    train_cache: Path, tmp_path: Path, alpha: float
) -> None:
    from kdpipe.base.errors import UsageError

    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    message = f"--alpha must be in [0, 1], not {alpha}"
    with pytest.raises(UsageError) as raised:  # alpha 2 gave a loss with the KL weighted -1
        kd.distillation_loss(logits, labels, torch.log_softmax(logits, -1), alpha=alpha,
                             temperature=4.0)  # fmt: skip
    assert str(raised.value) == message
    result = student(train_cache, tmp_path / "s", f"--alpha {alpha}")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_load_run_scores_what_evaluate_scores_and_refuses_a_tampered_run(
    teacher_run: Path, tmp_path: Path
) -> None:
    """Issue 27.8: a trained run as a model, with its preprocessing; an unfinished or
    edited run is refused with the message the command line gives."""
    run = kd.load_run(teacher_run)
    assert not run.model.training and run.data_config == run.card.data
    test_set = kd.load_dataset("synthetic", "test")
    errors = int((run.predict(test_set.images).argmax(1) != test_set.labels).sum())
    scored = invoke("evaluate", teacher_run, "--data synthetic --split test --format json")
    assert scored.exit_code == 0, scored.output
    (shown,) = json.loads(scored.output)
    assert errors == shown["errors"]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(kd.KdpipeError, match="unfinished run"):
        kd.load_run(unfinished)
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("model.json", "model.safetensors"):
        (edited / name).write_bytes((teacher_run / name).read_bytes())
    card = json.loads((edited / "model.json").read_text())
    card["data_config"]["mean"] = [0.0] * len(card["data_config"]["mean"])
    (edited / "model.json").write_text(json.dumps(card))
    with pytest.raises(kd.KdpipeError, match="edited after training"):
        kd.load_run(edited)
