"""Publishing results: tables on screen, CSV files, and generated Markdown sections.

Every command that measures something (``report``, ``storage``, ``bench``,
``evaluate``, ``caches``, ``lineage``) shows and writes its rows through here: the
rows as CSV, and a section of a Markdown file (between ``kdpipe:<section>`` markers)
with the table, the command that made it, the date and the machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from kdpipe.base.errors import UsageError

FORMATS = ("table", "csv", "json")


def cpu_name() -> str:
    """The processor's model name: ``platform.processor()`` says only ``x86_64`` on Linux,
    and two x86_64 machines can train the same command to different weights."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """The machine a table was made on, with what decides its bits: torch's CPU kernel level
    (``AVX512``, ``AVX2``...: the vector width changes the order of float sums) and threads."""
    import torch  # here, not at the top: a CSV or a table needs no torch

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}, "
        f"torch kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )


def publish(
    table: pd.DataFrame,
    *,
    csv_path: Path | None,
    markdown_path: Path | None,
    section: str,
    text: Callable[[], str],
) -> None:
    """The rows as CSV, and ``text()`` (the table with its command, date and machine) as a
    section of a Markdown file: what every measuring command writes."""
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv_path, index=False)
    if markdown_path is not None:
        replace_section(markdown_path, section, text())


def replace_section(path: Path, section: str, text: str) -> None:
    """Replace the text between this section's markers in ``path`` (or append it),
    leaving everything a person wrote around it untouched.

    The read-modify-write holds an exclusive lock on the file, so reports that
    run at once (``make -j2``) each keep their section instead of the last
    writer's copy erasing the others'.
    """
    begin, end = f"<!-- kdpipe:{section}:begin -->", f"<!-- kdpipe:{section}:end -->"
    block = f"{begin}\n{text}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        current = f.read()
        if begin in current and end in current:
            head, rest = current.split(begin, 1)
            _, tail = rest.split(end, 1)
            updated = head + block + tail
        else:
            separator = "\n" if current and not current.endswith("\n") else ""
            updated = current + separator + block + "\n"
        f.seek(0)
        f.truncate()
        f.write(updated)


def render(frame: pd.DataFrame, fmt: str) -> str:
    """One evaluation as a screen table (one field per line), CSV or JSON."""
    if fmt == "table":
        return frame.T.to_string(header=False)
    return render_rows(frame, fmt)


def render_rows(frame: pd.DataFrame, fmt: str) -> str:
    """Rows as a screen table, CSV or JSON."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        # through pandas' JSON (NaN -> null), re-dumped so paths keep their plain slashes
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=2)
    if fmt == "table":
        return frame.to_string(index=False)
    raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
