"""Consistent teaching: views replayed exactly, mixing, ensembles, top-k, transfer sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cache, invoke, student
from kdpipe.base.errors import CacheError
from kdpipe.cache import (
    VIEW_COLUMNS,
    VIEW_FIELDS,
    load_soft_labels,
    read_manifest,
    reconstruct_top_k,
)
from kdpipe.data.datasets import make_synthetic
from kdpipe.models.runs import load_model, read_config
from kdpipe.models.teacher import predict_logits
from kdpipe.tools.report import cache_command, command_line, report
from kdpipe.train import TrainConfig, TrainData, cache_data
from kdpipe.views.inputs import render
from kdpipe.views.policy import ViewPolicy, sample_views, view_schedule

CPU = torch.device("cpu")
DATA = make_synthetic("train")


def replay(store: Path, epoch: int, positions: torch.Tensor) -> tuple[dict, TrainData]:
    """What train-student feeds its model for these rows in this epoch."""
    soft = load_soft_labels(store)
    config = TrainConfig(
        model="kd_mlp", data="synthetic", out="-", epochs=1, cache=str(store), alpha=0.5
    )
    data, _, _ = cache_data(config, soft, DATA, log=print)
    _, card = load_model(Path(soft.manifest.teachers[0].run_dir))
    gathered = data.gather(positions, epoch, 0, config.seed)
    return TrainData.to_model(gathered, card.data, CPU), data


def teacher_logprobs(teacher: Path, inputs: torch.Tensor, temperature: float) -> torch.Tensor:
    model, _ = load_model(teacher)
    with torch.inference_mode():
        return torch.log_softmax(model(inputs) / temperature, dim=-1)


def pixels(inputs: torch.Tensor, teacher: Path) -> torch.Tensor:
    """Undo the normalisation: 0-255 pixel values of a model input."""
    _, card = load_model(teacher)
    mean = torch.tensor(card.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.data.std).view(1, -1, 1, 1)
    return (inputs * std + mean) * 255


def shifted(image: torch.Tensor, dy: int, dx: int, flip: bool) -> np.ndarray:
    """An independent shift and flip: the crop box starts (dy, dx) pixels from the corner,
    zeros outside the image, then a left-right mirror."""
    _, height, width = image.shape
    padded = np.zeros((image.shape[0], height + 16, width + 16))
    padded[:, 8 : 8 + height, 8 : 8 + width] = image.numpy()
    view = padded[:, 8 + dy : 8 + dy + height, 8 + dx : 8 + dx + width]
    return view[:, :, ::-1] if flip else view


def test_view_fields_are_the_documented_columns() -> None:
    """docs/cache-format.md lists the columns of the views array in the format's order."""
    text = (Path(__file__).parents[1] / "docs" / "cache-format.md").read_text()
    positions = [text.find(f"`{name}`") for name in VIEW_FIELDS]
    assert -1 not in positions and positions == sorted(positions)
    assert [VIEW_COLUMNS[name] for name in VIEW_FIELDS] == list(range(len(VIEW_FIELDS)))


def test_views_are_parameters_drawn_once_from_the_seed() -> None:
    policy = ViewPolicy("crop-flip", "cutmix")
    pool = np.arange(100)
    a, pa = sample_views(100, 4, policy, image_size=(28, 28), partner_pool=pool, seed=3)
    b, pb = sample_views(100, 4, policy, image_size=(28, 28), partner_pool=pool, seed=3)
    c, _ = sample_views(100, 4, policy, image_size=(28, 28), partner_pool=pool, seed=4)
    assert np.array_equal(a, b) and np.array_equal(pa, pb) and not np.array_equal(a, c)
    top, left, height, width = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 1 + 1e-6).all()
    assert ((height * width >= 0.25 - 1e-6) & (height * width <= 1 + 1e-6)).all()
    box_area = a[..., 8] * a[..., 9]
    assert np.allclose(a[..., 5], 1 - box_area, atol=1e-6)  # cutmix: λ follows the clipped box
    shifts, _ = sample_views(50, 2, ViewPolicy("shift-flip"), image_size=(28, 28),
                             partner_pool=pool, seed=0)  # fmt: skip
    assert np.allclose(shifts[..., 0] * 28, np.round(shifts[..., 0] * 28), atol=1e-4)
    assert np.abs(shifts[..., 0] * 28).max() <= 4


def test_crop_scale_bounds_the_crop_area_and_is_recorded_only_when_set() -> None:
    pool = np.arange(10)
    mild = ViewPolicy("crop-flip", crop_scale=(0.5, 0.75))
    a, _ = sample_views(500, 4, mild, image_size=(28, 28), partner_pool=pool, seed=0)
    area = a[..., 2] * a[..., 3]
    whole = np.isclose(area, 1.0)  # no box fitted in 10 tries: the whole image, as torchvision
    assert ((area[~whole] >= 0.5 - 1e-6) & (area[~whole] <= 0.75 + 1e-6)).all()
    assert whole.mean() < 0.01 and area[~whole].min() < 0.55 and area[~whole].max() > 0.7
    assert mild.to_dict()["crop_scale"] == [0.5, 0.75]
    # the default is not written, so caches made before the option keep their cache_id
    assert ViewPolicy("crop-flip").to_dict() == {"augment": "crop-flip", "mix": "none",
                                                 "mix_alpha": 1.0}  # fmt: skip
    default, _ = sample_views(50, 2, ViewPolicy("crop-flip", crop_scale=(0.25, 1.0)),
                              image_size=(28, 28), partner_pool=pool, seed=1)  # fmt: skip
    assert np.array_equal(default, sample_views(50, 2, ViewPolicy("crop-flip"),
                          image_size=(28, 28), partner_pool=pool, seed=1)[0])  # fmt: skip


def test_a_crop_scale_cache_is_another_cache(teacher_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "crops.zarr"
    options = "--temperature 2 --views 2 --augment crop-flip"
    assert cache(teacher_run, store, options).exit_code == 0
    default_id = read_manifest(store).cache_id
    # the CLI's default is the library's: nothing recorded, the id of a cache made before
    assert "crop_scale" not in read_manifest(store).views
    result = cache(teacher_run, store, f"{options} --crop-scale 0.5 1")
    assert result.exit_code == 1 and "made with other arguments" in result.output
    assert read_manifest(store).cache_id == default_id  # refused, not touched
    mild = tmp_path / "mild.zarr"
    assert cache(teacher_run, mild, f"{options} --crop-scale 0.5 1").exit_code == 0
    manifest = read_manifest(mild)
    assert manifest.views["crop_scale"] == [0.5, 1.0] and manifest.cache_id != default_id
    area = load_soft_labels(mild).views[..., 2] * load_soft_labels(mild).views[..., 3]
    assert (area >= 0.5 - 1e-6).all()
    assert "--augment crop-flip --crop-scale 0.5 1" in cache_command(mild)
    assert student(mild, tmp_path / "s", "--alpha 0.5 --epochs 1").exit_code == 0
    table = report([tmp_path / "s"])
    assert table["soft_labels"].tolist() == ["cache, 2 crop-flip (area 0.5-1) views"]
    # fresh crops in training: saved in config.json, resumed from it, shown in the report
    run = tmp_path / "t"
    result = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 "
                    "--augment crop-flip --crop-scale 0.6 0.9 --out", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = read_config(run)
    assert config["crop_scale"] == [0.6, 0.9]
    assert "--augment crop-flip --crop-scale 0.6 0.9" in command_line(config)
    assert "--crop-scale" not in command_line({**config, "crop_scale": [0.25, 1.0]})


def test_the_schedule_uses_every_view_once_in_any_v_epochs() -> None:
    used = torch.stack([view_schedule(40, 4, seed=1, epoch=e) for e in range(3, 7)])
    assert (used.sort(dim=0).values == torch.arange(4)[:, None]).all()
    assert not torch.equal(used[0], used[1])


def test_rendering_matches_an_independent_shift_and_flip() -> None:
    images = DATA.images[:6]
    params = torch.zeros(6, len(VIEW_FIELDS))
    params[:, 2:4] = 1.0
    params[:, 5] = 1.0
    shifts = [(2, -1), (0, 3), (-3, 0), (1, 1), (0, 0), (-1, 2)]
    for i, (dy, dx) in enumerate(shifts):
        params[i, 0], params[i, 1], params[i, 4] = dy / 12, dx / 12, i % 2
    out = render(images, params, None, (12, 12)) * 255
    for i, (dy, dx) in enumerate(shifts):
        expected = shifted(images[i], dy, dx, bool(i % 2))
        assert np.allclose(out[i].numpy(), expected, atol=1e-3), i


def test_student_replays_the_view_the_teacher_labelled(teacher_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "views.zarr"
    result = cache(teacher_run, store, "--temperature 3 --views 3 --augment shift-flip "
                   "--chunk-size 64 --seed 5")  # fmt: skip
    assert result.exit_code == 0, result.output
    soft = load_soft_labels(store)
    rows = torch.tensor([0, 17, 311, 599])
    for epoch in (1, 2, 3):
        batch, data = replay(store, epoch, rows)
        chosen = view_schedule(len(data), 3, 0, epoch)[rows]
        # the same pixels as an independent shift/flip of the same dataset images
        params = soft.views[rows, chosen]
        got = pixels(batch["inputs"], teacher_run)
        for j, row in enumerate(rows.tolist()):
            dy, dx = round(float(params[j, 0]) * 12), round(float(params[j, 1]) * 12)
            image = DATA.images[int(soft.indices[row])]
            expected = shifted(image, dy, dx, bool(params[j, 4]))
            assert np.allclose(got[j].numpy(), expected, atol=1e-3)
        # and the teacher's stored output for that view is the teacher on those pixels
        fresh = teacher_logprobs(teacher_run, batch["inputs"], 3.0)
        assert torch.allclose(batch["targets"], fresh, atol=2e-2)
        assert torch.allclose(batch["targets"], soft.values[rows, chosen].float())
    other = soft.values[rows, (chosen + 1) % 3].float()
    assert not torch.allclose(other, fresh, atol=2e-2)  # another view: another output


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_replay(teacher_run: Path, tmp_path: Path, mix: str) -> None:
    store = tmp_path / f"{mix}.zarr"
    result = cache(teacher_run, store, f"--temperature 2 --views 2 --mix {mix} --chunk-size 128")
    assert result.exit_code == 0, result.output
    soft = load_soft_labels(store)
    rows = torch.arange(0, 600, 37)
    batch, data = replay(store, 2, rows)
    chosen = view_schedule(len(data), 2, 0, 2)[rows]
    params, partners = soft.views[rows, chosen], soft.partners[rows, chosen]
    assert (partners >= 0).all() and (params[:, 5] < 1).any()
    own, other = DATA.images[rows].float(), DATA.images[partners].float()
    lam = params[:, 5].view(-1, 1, 1, 1)
    if mix == "mixup":
        expected = lam * own + (1 - lam) * other
    else:  # the partner's pixels inside the box, as fractions of the 12 x 12 output
        centres = (torch.arange(12) + 0.5) / 12
        top, left, height, width = (params[:, i].view(-1, 1, 1, 1) for i in range(6, 10))
        y, x = centres.view(1, 1, -1, 1), centres.view(1, 1, 1, -1)
        inside = (y >= top) & (y < top + height) & (x >= left) & (x < left + width)
        expected = torch.where(inside, other, own)
        assert torch.allclose(1 - inside.float().mean(dim=(1, 2, 3)), params[:, 5], atol=0.15)
    assert torch.allclose(pixels(batch["inputs"], teacher_run), expected, atol=1e-3)
    assert torch.equal(batch["partner_labels"], DATA.labels[partners])
    fresh = teacher_logprobs(teacher_run, batch["inputs"], 2.0)
    assert torch.allclose(batch["targets"], fresh, atol=2e-2)
    result = student(store, tmp_path / "s", "--alpha 0.5")
    assert result.exit_code == 0, result.output


def test_ensemble_values_are_the_independent_combination(teacher_run: Path, tmp_path: Path) -> None:
    second = tmp_path / "t2"
    result = invoke(
        "train-teacher --model kd_mlp --data synthetic --epochs 1 --seed 1 --out", second
    )
    assert result.exit_code == 0, result.output
    logits = []
    for run in (teacher_run, second):
        model, card = load_model(run)
        logits.append(predict_logits(model, DATA.images, card.data, device=CPU).double().numpy())
    temperature = 2.5
    for rule in ("mean-probs", "mean-logits"):
        store = tmp_path / f"{rule}.zarr"
        result = invoke("cache-teacher --data synthetic --teacher", teacher_run, "--teacher",
                        second, f"--temperature {temperature} --combine {rule} --dtype float32 "
                        "--out", store)  # fmt: skip
        assert result.exit_code == 0, result.output
        if rule == "mean-probs":  # Hinton: the arithmetic mean of the members' distributions
            probs = [np.exp(z / temperature) / np.exp(z / temperature).sum(1, keepdims=True)
                     for z in logits]  # fmt: skip
            expected = np.log((probs[0] + probs[1]) / 2)
        else:
            z = (logits[0] + logits[1]) / 2 / temperature
            expected = z - np.log(np.exp(z).sum(1, keepdims=True))
        soft = load_soft_labels(store)
        assert np.allclose(soft.values[:, 0].numpy(), expected, atol=1e-5)
        assert len(soft.manifest.teachers) == 2 and soft.manifest.combine == rule


def test_top_k_reconstruction_spreads_the_leftover_uniformly() -> None:
    dense = torch.log_softmax(torch.randn(20, 3, 10) * 3, dim=-1)
    for k in (1, 3, 10):
        top = dense.topk(k, dim=-1)
        rebuilt = reconstruct_top_k(top.values, top.indices, 10)
        assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(20, 3), atol=1e-5)
        assert torch.equal(rebuilt.gather(-1, top.indices), top.values)
        leftover = 1 - top.values.exp().sum(-1, keepdim=True)
        others = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, top.indices, False)
        uniform = (leftover / (10 - k)).expand_as(dense)[others] if k < 10 else torch.empty(0)
        assert torch.allclose(rebuilt.exp()[others], uniform, atol=1e-6)
    assert torch.allclose(reconstruct_top_k(*dense.topk(10, dim=-1), 10), dense)


def test_top_k_cache_trains_verifies_and_refuses_retempering(
    teacher_run: Path, train_cache: Path, tmp_path: Path
) -> None:
    store = tmp_path / "top2.zarr"
    result = cache(teacher_run, store, "--temperature 4 --top-k 2 --chunk-size 128")
    assert result.exit_code == 0, result.output
    soft, dense = load_soft_labels(store), load_soft_labels(train_cache)
    top_indices = soft.stored["topk_indices"].long()
    assert top_indices.shape == (600, 1, 2)
    assert {p.name for p in store.iterdir()} >= {"topk_logprobs", "topk_indices"}
    expected = dense.values.float().topk(2, dim=-1)
    # the stored classes hold the two largest values (float16 ties may swap equal classes)
    gathered = dense.values.float().gather(-1, top_indices)
    assert torch.allclose(gathered, expected.values, atol=2e-3)
    assert (top_indices == expected.indices).float().mean() > 0.95
    assert torch.allclose(soft.values.float(), expected.values, atol=2e-3)
    assert invoke("verify", store, "--data synthetic").exit_code == 0
    with pytest.raises(CacheError, match=r"top-2 cache at T=4: it cannot be re-tempered to T=2"):
        soft.log_probs(2.0)
    assert student(store, tmp_path / "s", "--alpha 0.5").exit_code == 0
    import zarr

    indices = zarr.open_array(str(store / "topk_indices"), mode="r+")
    indices[5, 0, 1] = 9  # a class that does not exist
    result = invoke("verify", store)
    assert result.exit_code == 1
    assert "top-k classes out of range, repeated or unsorted at row(s) 5" in result.output


def test_subset_and_excluded_classes_map_rows_to_samples(teacher_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "transfer.zarr"
    result = cache(teacher_run, store, "--temperature 2 --subset 0.25 --exclude-classes 1,3 "
                   "--seed 7 --chunk-size 50")  # fmt: skip
    assert result.exit_code == 0, result.output
    soft = load_soft_labels(store)
    kept = int((~np.isin(DATA.labels.numpy(), [1, 3])).sum())
    indices = soft.indices.numpy()
    assert len(indices) == round(0.25 * kept) and (np.diff(indices) > 0).all()
    assert not np.isin(DATA.labels.numpy()[indices], [1, 3]).any()
    assert torch.equal(soft.labels, DATA.labels[soft.indices])
    model, card = load_model(teacher_run)
    logits = predict_logits(model, DATA.images[soft.indices], card.data, device=CPU)
    assert torch.allclose(soft.values[:, 0].float(), torch.log_softmax(logits / 2, -1), atol=2e-2)
    manifest = soft.manifest
    assert manifest.transfer == {"dataset_samples": 600, "subset": 0.25,
                                 "exclude_classes": [1, 3], "labeled": True}  # fmt: skip
    assert invoke("verify", store, "--data synthetic").exit_code == 0
    other = tmp_path / "other.zarr"
    assert cache(teacher_run, other, "--temperature 2 --subset 0.25 --seed 8").exit_code == 0
    assert not np.array_equal(load_soft_labels(other).indices.numpy(), indices)
    result = student(store, tmp_path / "s", "--alpha 0.5")
    assert result.exit_code == 0, result.output
    assert f'rows": {len(indices)}' in (tmp_path / "s" / "model.json").read_text()


def test_unlabeled_transfer_sets_train_from_the_teacher_alone(
    teacher_run: Path, tmp_path: Path
) -> None:
    store = tmp_path / "nolabels.zarr"
    assert cache(teacher_run, store, "--temperature 2 --ignore-labels").exit_code == 0
    soft = load_soft_labels(store)
    assert (soft.labels == -1).all() and not soft.manifest.labeled
    assert soft.manifest.teacher_accuracy is None
    result = student(store, tmp_path / "s", "--alpha 0.5")
    assert result.exit_code == 0, result.output
    assert "has no labels (an unlabeled transfer set): --alpha 0.5 becomes 0" in result.output
    assert '"alpha": 0.0' in (tmp_path / "s" / "model.json").read_text()


def test_an_unlabeled_image_folder_is_a_transfer_set(teacher_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    for i in range(20):
        Image.fromarray(DATA.images[i, 0].numpy()).save(folder / "train" / f"{i:03d}.png")
    store = tmp_path / "folder.zarr"
    result = invoke("cache-teacher --data", folder, "--teacher", teacher_run,
                    "--temperature 2 --views 2 --augment flip --out", store)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no labels" in result.output
    soft = load_soft_labels(store)
    assert soft.manifest.classes == list(DATA.classes) and (soft.labels == -1).all()
    result = invoke("train-student --model kd_mlp --data", folder, "--epochs 1 --alpha 0 "
                    "--cache", store, "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.output
    for option, message in (
        ("--exclude-classes 1", "--exclude-classes needs labels"),
        ("--top-k 2", None),
    ):
        out = tmp_path / "x.zarr"
        result = invoke("cache-teacher --data", folder, "--teacher", teacher_run,
                        "--temperature 2 --overwrite --out", out, option)  # fmt: skip
        if message:
            assert result.exit_code == 1 and message in result.output
        else:
            assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "options,message",
    [
        ("--views 3", "--views 3 without --augment or --mix would store 3 identical copies"),
        ("--top-k 6", "--top-k 6 is more than the 5 classes"),
        ("--exclude-classes 9", "--exclude-classes 9: class ids are 0..4"),
        ("--exclude-classes 0,1,2,3,4", "the transfer set is empty"),
        ("--exclude-classes 1 --ignore-labels", "--exclude-classes needs labels"),
        ("--subset 0", "Invalid value for '--subset'"),
        ("--exclude-classes x", "'x' is not a comma-separated list of class ids"),
        (
            "--views 2 --augment crop-flip --crop-scale 0.8 0.5",
            "--crop-scale must be two area fractions 0 < MIN <= MAX <= 1, not 0.8 0.5",
        ),
        (
            "--views 2 --augment shift-flip --crop-scale 0.5 1",
            "--crop-scale sets the crops of --augment crop-flip, not of 'shift-flip'",
        ),
        ("--views 2 --augment crop-flip --crop-scale 0 1", "Invalid value for '--crop-scale'"),
    ],
)
def test_bad_transfer_and_view_options(
    teacher_run: Path, tmp_path: Path, options: str, message: str
) -> None:
    out = tmp_path / "bad.zarr"
    result = cache(teacher_run, out, f"--temperature 2 {options}")
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_a_views_cache_refuses_extra_augmentation(teacher_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "v.zarr"
    assert cache(teacher_run, store, "--temperature 2 --views 2 --augment flip").exit_code == 0
    for option in ("--augment crop-flip", "--jitter 1"):
        result = student(store, tmp_path / "s", f"--alpha 0.5 {option}")
        assert result.exit_code == 1
        assert "the student replays them, so --augment, --mix and --jitter must stay off" in (
            result.output
        )
    assert not (tmp_path / "s").exists()


def test_online_distillation_runs_timms_task(teacher_run: Path, tmp_path: Path) -> None:
    result = invoke("distill-online --model kd_mlp_30x2 --data synthetic --epochs 2 --teacher",
                    teacher_run, "--alpha 0.5 --temperature 2 --augment crop-flip --mix mixup "
                    "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (tmp_path / "o" / "model.json").read_text()
    assert '"kind": "online-student"' in text and '"online_teacher"' in text
    result = invoke("distill-online --model kd_mlp --data synthetic --epochs 1 --alpha 0.5 "
                    "--temperature 2 --out", tmp_path / "p")  # fmt: skip
    assert result.exit_code == 2 and "Missing option '--teacher'" in result.output


def test_storage_table_measures_bytes_and_top_k_loss(train_cache: Path, tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    result = invoke("storage", train_cache, "--top-k 1,2 --markdown", doc, "--csv",
                    tmp_path / "s.csv")  # fmt: skip
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv").set_index("storage")
    assert table.loc["dense float16", "raw_bytes_per_view"] == 2 * 5
    assert table.loc["top-2 float16", "raw_bytes_per_view"] == 2 * 2 + 2 * 2  # int16 classes
    # the top-1 loss, recomputed from the definition: leftover spread over 4 classes
    dense = load_soft_labels(train_cache).values.float()[:, 0]
    top = dense.max(-1).values
    rest = torch.log((1 - top.exp()).clamp_min(1e-8) / 4)
    probs = dense.exp()
    rebuilt = torch.where(dense == top[:, None], top[:, None], rest[:, None])
    expected = float((probs * (dense - rebuilt)).sum(-1).mean())
    assert table.loc["top-1 float16", "mean_kl"] == pytest.approx(expected, rel=1e-3)
    assert table.loc["top-2 float16", "mean_kl"] < table.loc["top-1 float16", "mean_kl"]
    assert (table["mean_kl"].dropna() >= 0).all()  # float rounding never reads as a gain
    assert 0 < table.loc["top-1 float16", "stored_bytes_per_view"] < 10
    assert "<!-- kdpipe:storage:begin -->" in doc.read_text()
    assert "K must be in 1..4" in invoke("storage", train_cache, "--top-k 5").output


def test_training_subsets_are_the_cache_subsets(train_cache: Path, tmp_path: Path) -> None:
    from kdpipe.data.datasets import select_rows

    store = tmp_path / "subset.zarr"
    teacher = Path(load_soft_labels(train_cache).manifest.teachers[0].run_dir)
    assert cache(teacher, store, "--temperature 2 --subset 0.3 --seed 4").exit_code == 0
    rows = select_rows(DATA.labels, subset=0.3, num_classes=5, seed=4)
    assert np.array_equal(load_soft_labels(store).indices.numpy(), rows)
    result = student(store, tmp_path / "s", "--alpha 0.5 --subset 0.3")
    assert result.exit_code == 1
    assert "defines the training rows: --subset is for training without a cache" in result.output


def test_augmenting_over_a_fixed_teacher_is_allowed_with_a_note(
    train_cache: Path, tmp_path: Path
) -> None:
    result = student(train_cache, tmp_path / "s", "--alpha 0.5 --augment flip")
    assert result.exit_code == 0, result.output
    assert "views the teacher never labelled (inconsistent teaching" in result.output
