"""Cached features and attention maps (issue 16): the teacher's layers, from the same
forward passes as the logits, for every stored view."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import cache, invoke, student
from kdpipe.cache import array_specs, load_soft_labels, read_manifest
from kdpipe.check.verify import verify_cache
from kdpipe.data.datasets import load_dataset
from kdpipe.models.runs import load_model
from kdpipe.views.inputs import view_input

PLAIN_ARRAYS = {"logprobs", "labels", "indices", "views", "partners", "chunk_digests", "progress"}


@pytest.fixture(scope="module")
def feature_cache(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features") / "f.zarr"
    made = cache(teacher_run, out, "--temperature 2 --views 2 --augment crop-flip --chunk-size "
                 "256 --features 0,pre_logits --attention features.7 --feature-grid 2")  # fmt: skip
    assert made.exit_code == 0, made.output
    return out


def test_cached_layers_are_the_teacher_s_own_for_every_view(
    feature_cache: Path, teacher_run: Path
) -> None:
    """Recomputed without hooks: kd_cnn's stages by slicing its Sequential, pre_logits by
    forward_head(pre_logits=True), the attention map by its formula, for each cropped and
    flipped view; float16 tolerance."""
    manifest = read_manifest(feature_cache)
    assert [(x.array, x.shape, x.pooling) for x in manifest.features] == [
        ("feature_features.3", [32, 2, 2], "adaptive-avg 2x2"),
        ("feature_pre_logits", [128], "none"),
        ("attention_features.7", [4], "adaptive-avg 2x2"),
    ]
    soft = load_soft_labels(feature_cache)
    model, card = load_model(teacher_run)
    images = load_dataset("synthetic", "train").images
    rows = soft.indices[:40]
    for view in range(2):
        params = soft.views[:40, view]
        assert not torch.equal(params[:, 2], torch.ones(40))  # real crops, not the plain image
        x = view_input(images[rows], params, None, card.data, torch.device("cpu"))
        with torch.no_grad():
            stage1 = model.features[:4](x)
            stage2 = model.features[:8](x)
            pre = model.forward_head(model.forward_features(x), pre_logits=True)
            logits = model(x)
        squares = stage2.pow(2).mean(1, keepdim=True)
        attention = F.normalize(F.adaptive_avg_pool2d(squares, 2).flatten(1), dim=1)
        expected = {
            "feature_features.3": F.adaptive_avg_pool2d(stage1, 2),
            "feature_pre_logits": pre,
            "attention_features.7": attention,
        }
        for array, value in expected.items():
            cached = soft.features[array][:40, view].float()
            assert cached.dtype == torch.float32 and soft.features[array].dtype == torch.float16
            torch.testing.assert_close(cached, value, atol=2e-2, rtol=2e-3)
        torch.testing.assert_close(
            soft.log_probs()[:40, view], torch.log_softmax(logits / 2, -1), atol=2e-2, rtol=0
        )


def test_feature_arrays_are_plain_zarr_chunked_and_covered_by_the_digests(
    feature_cache: Path, train_cache: Path
) -> None:
    group = zarr.open_group(str(feature_cache), mode="r")
    names = list(array_specs(read_manifest(feature_cache)))
    assert names[-3:] == ["feature_features.3", "feature_pre_logits", "attention_features.7"]
    assert group["chunk_digests"].shape == (3, len(names), 16)
    features = group["feature_features.3"]
    assert features.shape == (600, 2, 32, 2, 2) and str(features.dtype) == "float16"
    assert features.chunks == (256, 2, 32, 2, 2)
    report = verify_cache(feature_cache)
    assert report.ok, report.failures()
    from kdpipe.tools.report import cache_command

    rebuilt = cache_command(feature_cache)  # report's rebuilt command names the layers
    assert "--features features.3,pre_logits --attention features.7 --feature-grid 2" in rebuilt
    # a cache without features has exactly the arrays (and manifest fields) it had
    plain = zarr.open_group(str(train_cache), mode="r")
    assert set(plain.array_keys()) == PLAIN_ARRAYS
    manifest = read_manifest(train_cache)
    assert "features" not in manifest.to_dict() and "features" not in manifest.identity()


def test_a_chunk_of_features_copied_from_another_position_is_refused(
    feature_cache: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "f.zarr"
    shutil.copytree(feature_cache, copy)
    chunks = copy / "feature_pre_logits" / "c"
    (chunks / "1" / "0" / "0").write_bytes((chunks / "0" / "0" / "0").read_bytes())
    report = verify_cache(copy)
    assert not report.ok and "feature_pre_logits not what was written at chunk 1" in str(
        report.failures()
    )
    with pytest.raises(Exception, match="chunk 1 of 'feature_pre_logits'"):
        load_soft_labels(copy)


def test_verify_recompute_checks_the_cached_layers(
    feature_cache: Path, teacher_run: Path, tmp_path: Path
) -> None:
    import shutil

    from kdpipe.data.datasets import make_synthetic

    def recompute(store: Path) -> str:
        report = verify_cache(store, dataset=make_synthetic("train"), recompute=600,
                              teachers=[teacher_run])  # fmt: skip
        assert any(row["check"] == "recompute feature_pre_logits" for row in report.rows)
        return "\n".join(report.failures())

    assert recompute(feature_cache) == ""
    copy = tmp_path / "f.zarr"
    shutil.copytree(feature_cache, copy)
    hint = zarr.open_array(str(copy / "feature_pre_logits"), mode="r+")
    hint[300:302] = hint[300:302] + 1  # finite, plausible, not the teacher's
    failures = recompute(copy)
    assert "recompute feature_pre_logits: 600 random row(s)" in failures
    assert "differ at row(s) 300, 301" in failures


def test_layer_values_are_checked_by_verify() -> None:
    from kdpipe.cache import CachedLayer
    from kdpipe.check.verify import _layer_problems

    class Fake:
        features = (CachedLayer(name="x", kind="attention", array="attention_x", shape=[4],
                                pooling="none"),)  # fmt: skip

    good = F.normalize(torch.rand(3, 2, 4), dim=-1).numpy().astype(np.float16)
    assert _layer_problems(Fake, {"attention_x": good}, 0) == []
    bad = good.copy()
    bad[1, 0, 0] = np.nan
    bad[2, 1] *= 2
    (problem,) = _layer_problems(Fake, {"attention_x": bad}, 10)
    assert problem.endswith("at row(s) 11, 12")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--features conv9", "has no layer 'conv9': valid layers are features.3, features.7, "
         "pre_logits"),
        ("--attention pre_logits", "an attention map needs a spatial map (N, C, H, W)"),
        ("--features 0,features.3", "a layer is asked for twice"),
    ],
)  # fmt: skip
def test_bad_layer_requests_are_one_clear_line(
    teacher_run: Path, tmp_path: Path, options: str, message: str
) -> None:
    result = cache(teacher_run, tmp_path / "x.zarr", f"--temperature 2 {options}")
    assert result.exit_code != 0
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert message in line
    assert not (tmp_path / "x.zarr").exists()


def _patch_load_model(monkeypatch: pytest.MonkeyPatch, forbidden: Path) -> None:
    """Every module's load_model fails on ``forbidden`` (the teacher's run directory)."""
    import sys

    import kdpipe.models.runs

    original = kdpipe.models.runs.load_model

    def guarded(run_dir: Path, *args: object, **kwargs: object) -> object:
        assert Path(run_dir).resolve() != forbidden.resolve(), "the teacher was loaded"
        return original(run_dir, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("kdpipe") and getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", guarded)


def test_a_feature_student_trains_without_its_teacher_and_saves_no_projector(
    feature_cache: Path, teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from kdpipe.models.registry import create_model

    _patch_load_model(monkeypatch, teacher_run)
    runs = {}
    for name, options in (
        ("plain", ""),
        ("hint", "--feature-loss hint --student-layer pre_logits --teacher-layer pre_logits"),
        ("attention", "--feature-loss attention --feature-weight 100 --student-layer 1 "
         "--teacher-layer features.7"),
    ):  # fmt: skip
        out = tmp_path / name
        result = student(feature_cache, out, f"--alpha 0.5 --model kd_cnn {options}")
        assert result.exit_code == 0, result.output
        _, card = load_model(out)
        saved = safetensors.torch.load_file(str(out / "model.safetensors"))
        fresh = create_model("kd_cnn", num_classes=5, data_config=card.data).state_dict()
        assert set(saved) == set(fresh)  # the projector is not part of the model
        runs[name] = card.weights_sha256
        if options:  # report's rebuilt command carries the feature options
            import json

            from kdpipe.tools.report import command_line

            rebuilt = command_line(json.loads((out / "config.json").read_text()))
            assert f"--feature-loss {name}" in rebuilt and "--teacher-layer " in rebuilt
    assert len(set(runs.values())) == 3  # each feature term changed what was learned


def test_a_resumed_feature_run_ends_where_an_uninterrupted_one_does(
    feature_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The projector is in the checkpoints: stopped after epoch 1 and resumed, a feature
    run ends with the weights of the run that was not stopped."""
    import kdpipe.train.loop as loop
    from kdpipe.models.runs import read_card

    options = "--alpha 0.5 --feature-loss hint --student-layer 0 --teacher-layer features.3"
    options += " --model kd_cnn"
    assert student(feature_cache, tmp_path / "whole", options).exit_code == 0

    class Killed(Exception):
        pass

    saved = loop.save_checkpoint

    def save_then_die(run_dir: Path, epoch: int, state: object, *args: object) -> None:
        assert "term.projector.weight" in state.state_dict()
        saved(run_dir, epoch, state, *args)
        raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        student(feature_cache, tmp_path / "stopped", options)
    monkeypatch.setattr(loop, "save_checkpoint", saved)
    assert invoke("train-student --resume", tmp_path / "stopped").exit_code == 0
    stopped, whole = (read_card(tmp_path / n).weights_sha256 for n in ("stopped", "whole"))
    assert stopped == whole


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--feature-loss hint --student-layer 0 --teacher-layer pre_logits",
         "holds no cached layers; make one with cache-teacher --features NAME"),
        ("--feature-loss hint --student-layer fc9 --teacher-layer pre_logits",
         "student kd_mlp_30x2 has no layer 'fc9': valid layers are features.2, features.5, "
         "pre_logits"),
        ("--feature-loss hint --student-layer 0 --teacher-layer features.3",
         "outputs (30,), teacher layer features.3 (32, 2, 2): a projector maps a spatial map"),
        ("--feature-loss attention --student-layer 0 --teacher-layer features.7",
         "attention transfer needs a spatial map (C, H, W)"),
        ("--feature-loss hint --student-layer 0 --teacher-layer features.7",
         "has no cached features of that layer (--feature-loss hint); it has features.3 "
         "(features), pre_logits (features), features.7 (attention)"),
        ("--student-layer 0", "--student-layer and --teacher-layer go with --feature-loss"),
    ],
)  # fmt: skip
def test_bad_feature_loss_options_are_one_clear_line(
    feature_cache: Path, train_cache: Path, tmp_path: Path, options: str, message: str
) -> None:
    soft = train_cache if "no cached layers" in message else feature_cache
    result = student(soft, tmp_path / "s", f"--alpha 0.5 {options}")
    assert result.exit_code != 0
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert message in line
    assert not (tmp_path / "s").exists()  # refused before the run directory was made


def test_timm_s_own_layer_names_and_indices_are_those_of_forward_intermediates() -> None:
    """A timm ResNet: feature_info module names, their indices (forward_intermediates'),
    and pre_logits, each tapped output equal to what timm's own API returns."""
    import timm
    from kdpipe.views.features import LayerRequest, LayerTaps, feature_layers

    model = timm.create_model("resnet10t", num_classes=5, in_chans=1).eval()
    names = feature_layers(model)
    assert names["2"] == "layer2" and names["layer4"] == "layer4"
    assert names["pre_logits"] == "pre_logits"
    x = torch.randn(2, 1, 32, 32)
    requests = [LayerRequest(names["2"], "features"), LayerRequest("pre_logits", "features")]
    with torch.no_grad(), LayerTaps(model, requests) as taps:
        logits = model(x)
        tapped = taps.outputs()
        _, (layer2,) = model.forward_intermediates(x, indices=[2])
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(tapped["feature_layer2"], layer2)
    assert torch.equal(tapped["feature_pre_logits"], pre)
    assert torch.equal(model.get_classifier()(pre), logits)


def test_kd_models_expose_named_layers_without_changing_their_weights() -> None:
    from kdpipe.models.registry import create_model
    from kdpipe.views.features import feature_layers
    from kdpipe.views.inputs import DataConfig

    config = DataConfig(input_size=(1, 12, 12), mean=(0.5,), std=(0.25,))
    mlp = create_model("kd_mlp", num_classes=5, data_config=config,
                       model_kwargs={"hidden_sizes": [20, 10]})  # fmt: skip
    assert feature_layers(mlp) == {"features.2": "features.2", "0": "features.2",
                                   "features.5": "features.5", "1": "features.5",
                                   "pre_logits": "pre_logits"}  # fmt: skip
    cnn = create_model("kd_cnn", num_classes=5, data_config=config)
    x = torch.randn(3, 1, 12, 12)
    for model in (mlp, cnn.eval()):
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(model.forward_head(pre), model(x))
        assert not any("feature_info" in key for key in model.state_dict())


def test_online_feature_term_is_the_cached_term_paid_at_every_step(teacher_run: Path) -> None:
    """distill-online --feature-loss taps the teacher's layer in timm's own teacher forward:
    its loss is timm's logit loss plus β times the same feature term, recomputed here from
    each network's own layers."""
    import contextlib
    from types import SimpleNamespace

    from kdpipe.models.registry import create_model
    from kdpipe.tasks.classify.loss import hint_loss
    from kdpipe.train.plan import online_layer
    from kdpipe.train.step import FeatureTerm, OnlineDistillation

    torch.manual_seed(0)
    teacher, card = load_model(teacher_run)
    config = SimpleNamespace(feature_loss="hint", teacher_layer="1", teacher=str(teacher_run),
                             model="kd_cnn_tiny", student_layer="features.7",
                             feature_weight=0.5)  # fmt: skip
    layer = online_layer(teacher, card, config)
    assert (layer.name, layer.kind, layer.pooling) == ("features.7", "features", "none")
    assert layer.shape == [64, 3, 3]  # the synthetic set is 12 px: kd_cnn's 64 maps of 3x3
    tiny = create_model("kd_cnn_tiny", num_classes=5, data_config=card.data).eval()
    term = FeatureTerm.build(tiny, config, layer)
    options = dict(alpha=0.5, temperature=2.0, device=torch.device("cpu"),
                   amp=contextlib.nullcontext())  # fmt: skip
    with_term = OnlineDistillation(tiny, teacher.eval(), feature=term, **options)
    without = OnlineDistillation(tiny, teacher.eval(), **options)
    images = load_dataset("synthetic", "train").images[:8]
    batch = {"inputs": view_input(images, None, None, card.data, torch.device("cpu")),
             "labels": torch.arange(8) % 5, "lam": None, "partner_labels": None}  # fmt: skip
    extra = with_term(batch)["loss"] - without(batch)["loss"]
    with torch.no_grad():
        expected = 0.5 * hint_loss(
            term.projector(tiny.features[:8](batch["inputs"])),
            teacher.features[:8](batch["inputs"]),
        )
    assert torch.allclose(extra, expected, rtol=1e-5, atol=1e-6)


def test_distill_online_with_a_feature_term_saves_no_projector(
    teacher_run: Path, tmp_path: Path
) -> None:
    import safetensors.torch
    from kdpipe.models.registry import create_model

    options = ("distill-online --model kd_cnn_tiny --data synthetic --epochs 1 --alpha 0.5 "
               "--temperature 2 --teacher")  # fmt: skip
    result = invoke(options, teacher_run, "--out", tmp_path / "o", "--feature-loss attention "
                    "--feature-weight 10 --student-layer 1 --teacher-layer features.7")  # fmt: skip
    assert result.exit_code == 0, result.output
    _, card = load_model(tmp_path / "o")
    saved = safetensors.torch.load_file(str(tmp_path / "o" / "model.safetensors"))
    fresh = create_model("kd_cnn_tiny", num_classes=5, data_config=card.data).state_dict()
    assert set(saved) == set(fresh)
    result = invoke(options, teacher_run, "--out", tmp_path / "p", "--feature-loss hint "
                    "--student-layer 1 --teacher-layer layer9")  # fmt: skip
    assert result.exit_code != 0
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert f"teacher {teacher_run} has no layer 'layer9': valid layers are features.3" in line
    assert not (tmp_path / "p").exists()


def test_a_report_of_feature_runs_shows_each_term_and_the_bytes_of_its_cache(
    feature_cache: Path, train_cache: Path, tmp_path: Path
) -> None:
    """Beyond logits, what a cache holds is part of the result: the table names each run's
    feature term and the bytes per sample-view of the cache it read, measured on disk."""
    from kdpipe.tools.report import report, to_markdown

    plain, hint = tmp_path / "plain-s0", tmp_path / "hint-s0"
    assert student(train_cache, plain, "--alpha 0.5 --model kd_cnn --epochs 1").exit_code == 0
    options = ("--alpha 0.5 --model kd_cnn --epochs 1 --feature-loss hint --feature-weight 2 "
               "--student-layer 0 --teacher-layer features.3")  # fmt: skip
    assert student(feature_cache, hint, options).exit_code == 0
    table = report([plain, hint]).set_index("group")
    assert table.loc["hint", "feature"] == "hint 0 → features.3, β 2"  # the layers as asked
    assert table.loc["plain", "feature"] == ""
    for group, soft in (("plain", train_cache), ("hint", feature_cache)):
        manifest = read_manifest(soft)
        on_disk = sum(p.stat().st_size for p in soft.rglob("*") if p.is_file())
        expected = on_disk / (manifest.num_samples * manifest.num_views)
        assert table.loc[group, "cache_bytes_per_view"] == pytest.approx(expected)
    assert table.loc["hint", "cache_bytes_per_view"] > table.loc["plain", "cache_bytes_per_view"]
    markdown = to_markdown(table.reset_index())
    assert "| feature term" in markdown and "cache bytes / sample-view" in markdown


def test_the_export_of_a_feature_student_has_no_projector(
    feature_cache: Path, tmp_path: Path
) -> None:
    """The projector trains with the student and stops there: the exported graph of a hint
    student holds exactly the initializers of a plain student of the same architecture."""
    import onnx

    shapes = {}
    for name, options in (("plain", ""), ("hint", "--feature-loss hint --student-layer 0 "
                                                  "--teacher-layer features.3")):  # fmt: skip
        run = tmp_path / name
        result = student(feature_cache, run, f"--alpha 0.5 --model kd_cnn --epochs 1 {options}")
        assert result.exit_code == 0, result.output
        out = tmp_path / f"{name}.onnx"
        assert invoke("export", run, "--out", out).exit_code == 0
        graph = onnx.load(str(out)).graph
        shapes[name] = sorted((i.name, tuple(i.dims)) for i in graph.initializer)
    assert shapes["hint"] == shapes["plain"]
    assert not any("projector" in name or "term" in name for name, _ in shapes["hint"])
