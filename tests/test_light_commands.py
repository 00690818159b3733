"""Commands that only read manifests, checksums or tables import no deep-learning library
(issue 27.14): each runs in a fresh interpreter, which reports what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke
from kdpipe.cache import reconstruct_top_k, reconstruct_top_k_numpy
from PIL import Image

HEAVY = ("torch", "timm", "torchvision")
# run the CLI, then say which of HEAVY the process imported (at exit, whatever the command did)
PROBE = (
    "import sys, json\n"
    "from kdpipe.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
    f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
)


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image folder of mixed sizes, a teacher on it, its cache and a student."""
    root = tmp_path_factory.mktemp("light")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("cat", "dog"):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(12, 24, 2))
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "data" / split / name / f"{i}.png")
    data = root / "data"
    steps = [
        f"train-teacher --model kd_cnn --data {data} --epochs 1 --out {root / 'teacher'}",
        f"cache-teacher --data {data} --teacher {root / 'teacher'} --temperature 4 "
        f"--out {root / 'cache.zarr'}",
        f"train-student --model kd_mlp_30x2 --data {data} --epochs 1 "
        f"--cache {root / 'cache.zarr'} --alpha 0.5 --out {root / 'student'}",
    ]
    for step in steps:
        result = invoke(step)
        assert result.exit_code == 0, result.output
    return root


def run_light(*args: str | Path) -> dict:
    """One command in a fresh interpreter: its exit code and the heavy modules it imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True, env=env, check=False)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "command",
    [
        ("caches", "cache.zarr"),
        ("verify", "cache.zarr"),
        ("lineage", "student"),
        ("lineage", "teacher"),
        ("report", "student"),
        ("storage", "cache.zarr", "--top-k", "1"),
    ],
)
def test_a_command_that_reads_records_imports_no_deep_learning_library(
    folder_runs: Path, command: tuple[str, ...]
) -> None:
    name, target, *rest = command
    outcome = run_light(name, folder_runs / target, *rest)
    assert outcome == {"code": 0, "heavy": []}, (command, outcome)


def test_lineage_without_torch_still_catches_changed_weights(folder_runs: Path, tmp_path) -> None:
    """The weights hash read from the file's own framing is the model's: a changed value is
    a MISMATCH, as when the model was built to hash it."""
    import shutil

    run = tmp_path / "teacher"
    shutil.copytree(folder_runs / "teacher", run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    result = invoke("lineage", run)
    assert "MISMATCH" in result.output and "weights hash" in result.output, result.output


def test_top_k_rebuilt_in_numpy_equals_the_torch_rule() -> None:
    """``kdpipe storage`` measures with the numpy twin of the rule students are trained on."""
    logits = torch.randn(5, 2, 7) * 3
    logprobs = torch.log_softmax(logits, -1)
    for k in (1, 3, 7):
        top = logprobs.topk(k, dim=-1)
        want = reconstruct_top_k(top.values, top.indices, 7).numpy()
        got = reconstruct_top_k_numpy(top.values.numpy(), top.indices.numpy(), 7)
        # float32 sums in another order: 1 - sum(p_topk) differs in its last bits
        np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=0, atol=1e-6)
