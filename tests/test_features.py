"""Cached features and attention maps (issue 16): the teacher's layers, from the same
forward passes as the logits, for every stored view."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import cache

from pipeline.cache import array_specs, load_soft_labels, read_manifest
from pipeline.data import load_dataset
from pipeline.inputs import view_input
from pipeline.runs import load_model
from pipeline.verify import verify_cache

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


def test_layer_values_are_checked_by_verify() -> None:
    from pipeline.cache import CachedLayer
    from pipeline.verify import _layer_problems

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
