"""Models come from timm's registry; the weights hash identifies a teacher version."""

import pytest
import safetensors.torch
import timm
import torch
from kdpipe.base.errors import ModelError
from kdpipe.models.registry import create_model, param_count, weights_sha256
from kdpipe.views.inputs import DataConfig
from timm.data import resolve_data_config

GRAY28 = DataConfig(input_size=(1, 28, 28), mean=(0.3,), std=(0.35,))


def test_kdpipe_models_are_in_timms_registry() -> None:
    assert {"kd_mlp", "kd_mlp_1200x2", "kd_mlp_800x2", "kd_mlp_30x2", "kd_cnn"} <= set(
        timm.list_models("kd_*")
    )
    hinton_student = timm.create_model("kd_mlp_800x2", num_classes=10, in_chans=1)
    assert param_count(hinton_student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    teacher = timm.create_model("kd_mlp_1200x2", num_classes=10, in_chans=1, drop_rate=0.5)
    assert any(isinstance(m, torch.nn.Dropout) for m in teacher.modules())
    # the beyond-logits ladder: kd_cnn, its teacher assistant, its small student
    widths = [param_count(timm.create_model(n, num_classes=10, in_chans=1))
              for n in ("kd_cnn", "kd_cnn_mid", "kd_cnn_tiny")]  # fmt: skip
    assert widths == [421834, 105962, 26746]


def test_kd_cnn256_drops_before_and_after_its_hidden_layer() -> None:
    """kd_cnn256 (issue 28's teacher): kd_cnn's convolutions, 256 hidden units, dropout on
    both sides of them; kd_cnn's own layout (and its published weights) unchanged."""
    wide = timm.create_model("kd_cnn256", num_classes=10, in_chans=1, drop_rate=0.3)
    assert param_count(wide) == 421834 - 3136 * 128 - 128 - 1290 + 3136 * 256 + 256 + 2570
    layers = list(wide.features)
    hidden = next(i for i, m in enumerate(layers) if isinstance(m, torch.nn.Linear))
    assert isinstance(layers[hidden - 1], torch.nn.Dropout) and layers[hidden - 1].p == 0.3
    assert isinstance(layers[hidden + 2], torch.nn.Dropout) and layers[hidden + 2].p == 0.3
    plain = timm.create_model("kd_cnn", num_classes=10, in_chans=1, drop_rate=0.3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in plain.modules()) == 1
    assert "features.9.weight" in plain.state_dict()  # kd_cnn's hidden layer where it was


@pytest.mark.parametrize("name", ["kd_mlp_30x2", "kd_cnn", "resnet10t"])
def test_create_model_uses_the_datasets_shape_and_statistics(name: str) -> None:
    config = DataConfig(input_size=(3, 16, 16), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    model = create_model(name, num_classes=7, data_config=config)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    resolved = resolve_data_config({}, model=model)
    assert resolved["input_size"] == (3, 16, 16)
    assert resolved["mean"] == (0.1, 0.2, 0.3) and resolved["std"] == (0.4, 0.5, 0.6)


def test_hidden_sizes_choose_the_mlp_layers() -> None:
    model = create_model(
        "kd_mlp", num_classes=3, data_config=GRAY28, model_kwargs={"hidden_sizes": [5, 4, 2]}
    )
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [5, 4, 2, 3]


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown architecture 'resnet9000'"):
        create_model("resnet9000", num_classes=10, data_config=GRAY28)


def test_weights_hash_follows_content_not_files(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("kd_cnn", num_classes=10, data_config=GRAY28)
    digest = weights_sha256(model)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "a.safetensors"))
    torch.manual_seed(1)
    other = create_model("kd_cnn", num_classes=10, data_config=GRAY28)
    assert weights_sha256(other) != digest
    other.load_state_dict(safetensors.torch.load_file(str(tmp_path / "a.safetensors")))
    assert weights_sha256(other) == digest
    with torch.no_grad():
        other.head.bias[0] += 1e-3
    assert weights_sha256(other) != digest
