"""``kdpipe lineage student.onnx``: an exported file back to its run, cache, teacher, data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from kdpipe.base.errors import KdpipeError
from kdpipe.export.onnx import read_onnx_card
from kdpipe.models.runs import load_model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_lineage(
    path: Path,
    *,
    data_root: Path = Path("data"),
    image_size: int | None = None,
    channels: int | None = None,
) -> pd.DataFrame:
    """The file's own link, the run it was made from (its weights hash recomputed and
    compared with the one the file records), a QAT run's float32 starting point, then
    the run's chain as :func:`kdpipe.check.catalog.lineage` gives it."""
    from kdpipe.check.catalog import lineage

    card = read_onnx_card(path)  # a file that is not kdpipe's stops here
    rows = [
        {
            "link": f"onnx {card.format}",
            "path": str(path),
            "id": file_sha256(path)[:16],
            "status": "verified",
            "detail": f"kdpipe metadata read; made from weights {card.weights_sha256[:16]}",
        }
    ]
    run_dir = Path(card.run_dir)
    try:
        _, run_card = load_model(run_dir)
    except KdpipeError as exc:
        status = "MISMATCH" if (run_dir / "model.json").is_file() else "missing"
        rows.append(_row("run", run_dir, card.weights_sha256, status, str(exc)))
        return pd.DataFrame(rows)
    if run_card.weights_sha256 != card.weights_sha256:
        rows.append(
            _row(
                "run",
                run_dir,
                card.weights_sha256,
                "MISMATCH",
                f"the file was made from weights {card.weights_sha256[:16]}, the run now has "
                f"{run_card.weights_sha256[:16]}",
            )
        )
        return pd.DataFrame(rows)
    chain = lineage(run_dir, data_root=data_root, image_size=image_size, channels=channels)
    started = (card.lineage or {}).get("qat_from")
    if started:
        rows_after = chain.iloc[1:].to_dict("records")
        chain = pd.DataFrame([chain.iloc[0].to_dict(), _started_from(started), *rows_after])
    return pd.concat([pd.DataFrame(rows), chain], ignore_index=True)


def _row(link: str, path: Path, identity: str, status: str, detail: str) -> dict:
    return {"link": link, "path": str(path), "id": identity[:16], "status": status,
            "detail": detail}  # fmt: skip


def _started_from(record: dict) -> dict:
    """The float32 run a QAT run was fine-tuned from, its weights hash recomputed."""
    run_dir, expected = Path(record["run_dir"]), record["weights_sha256"]
    try:
        _, card = load_model(run_dir)
    except KdpipeError as exc:
        status = "MISMATCH" if (run_dir / "model.json").is_file() else "missing"
        return _row("qat from", run_dir, expected, status, str(exc))
    if card.weights_sha256 != expected:
        return _row("qat from", run_dir, expected, "MISMATCH",
                    f"QAT started from weights {expected[:16]}, these are "
                    f"{card.weights_sha256[:16]}")  # fmt: skip
    return _row("qat from", run_dir, expected, "verified", "weights hash recomputed")
