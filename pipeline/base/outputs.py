"""The one guard of every output a command writes (issue 24, "nothing lost").

The rule, the same for every command: an existing output is replaced only with
``--overwrite``; ``--overwrite`` replaces only what kdpipe itself wrote and can
recognise (a run directory by its ``model.json``/``config.json``, a cache by its
``zarr.json`` manifest, a file by its own header or marker, a work folder by the
``.kdpipe-output`` marker kdpipe put in it); and never, with or without it, a path
that is, or holds, the working directory, the home folder, kdpipe's checkout, the
filesystem root, the data or any input, nor a path inside an input. Paths are
resolved (``..``, symlinks) before deciding. Anything else is one line naming the
path and the reason, and nothing is touched.

A Markdown file given to ``--markdown`` is not replaced but edited: only the
command's own section (between its markers) changes, so it needs no
``--overwrite``, but it must be a Markdown file (``.md``/``.markdown``, or one that
already holds kdpipe's markers).

The guard also remembers what the command is writing, so that an error of the disk
without a file name ("No space left on device") can name it (:func:`writing`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdpipe.base.errors import OutputExistsError, UsageError
from kdpipe.cache.location import Location

MARKER = ".kdpipe-output"  # in a work folder kdpipe made: what made it
PNG_SOFTWARE = "kdpipe"  # the tEXt "Software" of every PNG kdpipe draws (png_metadata)
_SNIFF = 1 << 20  # bytes of an existing file read to recognise it

Paths = Sequence[str | Path | Location | None]


@dataclass(frozen=True)
class Output:
    """What a command writes at a path, and how kdpipe recognises one it wrote before."""

    what: str  # for messages: "a run directory", "a cache", "a CSV table of kdpipe report"
    ours: Callable[[Location], bool]
    folder: bool = False  # an empty folder there holds nothing to lose
    edits: bool = False  # a Markdown file: only the command's own section is replaced


def guard_output(
    path: str | Path | Location,
    kind: Output,
    *,
    overwrite: bool,
    inputs: Paths = (),
    option: str = "--out",
) -> Location:
    """Make ``path`` ready to be written as ``kind``: refuse it (one line, nothing touched)
    or, for an existing output kdpipe made and ``overwrite``, let it be replaced (a folder
    is removed now; a file is left for the writer to replace, so a command that fails
    later leaves it as it was). Call only once the inputs are validated, so that a bad
    input never costs what is already there."""
    location = Location(path)
    check_output(location, inputs, option=option)
    _writing.append(location)
    if not _exists(location):
        return location
    if kind.edits:
        if not kind.ours(location):
            raise UsageError(f"{option} {location} is not {kind.what}: kdpipe edits only such a "
                             "file; choose another path")  # fmt: skip
        return location
    if kind.folder and _empty_folder(location):
        location.path.rmdir()  # nothing to lose: the writer makes it afresh
        return location
    if not overwrite:
        raise OutputExistsError(
            f"{location} already exists: choose another path or pass --overwrite"
        )
    if not kind.ours(location):
        raise OutputExistsError(
            f"{option} {location} already exists and is not {kind.what} kdpipe wrote: "
            "--overwrite replaces only kdpipe's own outputs; choose another path"
        )
    if kind.folder:
        _remove(location)
    return location


def check_output(output: str | Path | Location, inputs: Paths, *, option: str = "--out") -> None:
    """The checks that need no look at what is there: the output may not be, hold or lie
    inside an input, nor be or hold the working directory, the home folder, kdpipe's
    checkout or the filesystem root (``--overwrite`` would remove them)."""
    output = Location(output)
    if not output.local:
        _check_url(output, inputs, option)
        return
    target = _resolved(output.path)
    for given in inputs:
        if given is None or not Location(given).local:
            continue
        source = _resolved(Location(given).path)
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = (
                "is" if target == source else "holds" if source.is_relative_to(target) else
                "lies inside"
            )  # fmt: skip
            raise UsageError(
                f"the output {output} {relation} the input {given}: writing it would destroy "
                "or change an input; choose another output path"
            )
    for place, name in _protected():
        if place.is_relative_to(target):
            relation = "is" if place == target else "holds"
            raise UsageError(
                f"{option} {output} {relation} {name} ({place}): kdpipe never writes over it; "
                "choose another path"
            )


def _protected() -> list[tuple[Path, str]]:
    places = [(Path.cwd(), "the working directory"), (Path.home(), "your home folder"),
              (Path(__file__).resolve().parents[1], "kdpipe's checkout"),
              (Path(Path.cwd().anchor), "the filesystem root")]  # fmt: skip
    return [(_resolved(place), name) for place, name in places]


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def _check_url(output: Location, inputs: Paths, option: str) -> None:
    """An object-store output is refused when it is, holds or lies in an input of the same
    store, and when it is a whole bucket (no key under it)."""
    key = PurePosixPath(output.root.rstrip("/"))
    if len(key.parts) < 2:
        raise UsageError(f"{option} {output} is a whole bucket: give a key under it")
    for given in inputs:
        if given is None:
            continue
        source = Location(given)
        if source.local or type(source.fs) is not type(output.fs):
            continue
        other = PurePosixPath(source.root.rstrip("/"))
        if key == other or key.is_relative_to(other) or other.is_relative_to(key):
            raise UsageError(
                f"the output {output} overlaps the input {given}: writing it would destroy or "
                "change an input; choose another output path"
            )


def _exists(location: Location) -> bool:
    if location.local:
        return location.path.exists() or location.path.is_symlink()
    return location.exists()


def _empty_folder(location: Location) -> bool:
    if location.local:
        path = location.path
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    return False


def _remove(location: Location) -> None:
    """Remove the output; a symlink is removed itself, never what it points at."""
    if location.local:
        path = location.path
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
        return
    location.remove()


# --- what kdpipe wrote, recognised ----------------------------------------------------------
def _json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes()[:_SNIFF])
    except (OSError, ValueError):
        return None


def _is_run(location: Location) -> bool:
    """A run directory: its ``model.json`` (a finished run) or its ``config.json`` (one
    kdpipe started), each with kdpipe's own fields."""
    if not location.local or not location.path.is_dir():
        return False
    card = _json(location.path / "model.json")
    if isinstance(card, dict) and {"architecture", "weights_sha256", "kind"} <= card.keys():
        return True
    config = _json(location.path / "config.json")
    return isinstance(config, dict) and config.get("kind") in (
        "teacher", "student", "online-student", "qat-student"
    )  # fmt: skip


def _is_cache(location: Location) -> bool:
    """A cache: a Zarr group whose ``zarr.json`` carries kdpipe's manifest (complete or
    still being written)."""
    from kdpipe.base.errors import CacheError
    from kdpipe.cache import read_cache_manifest

    try:
        read_cache_manifest(location)  # classification or detection
    except (CacheError, OSError):
        return False
    return True


def _is_onnx(location: Location) -> bool:
    from kdpipe.base.errors import ExportError
    from kdpipe.export.onnx import read_onnx_card

    try:
        read_onnx_card(location.path)
    except (ExportError, OSError, ValueError):
        return False
    return True


def _marked(*kinds: str) -> Callable[[Location], bool]:
    def ours(location: Location) -> bool:
        if not location.local or not location.path.is_dir():
            return False
        record = _json(location.path / MARKER)
        return isinstance(record, dict) and record.get("kind") in kinds

    return ours


def mark_folder(path: Path, kind: str) -> None:
    """Write the marker by which a later ``--overwrite`` knows the folder as kdpipe's."""
    (Path(path) / MARKER).write_text(json.dumps({"kind": kind, "made_by": "kdpipe"}) + "\n")


def table_file(*columns: str) -> Callable[[Location], bool]:
    """A table kdpipe wrote, known by its own header: a CSV whose first line names
    ``columns``, JSON records with those fields, or a screen table (one row per line, or
    one field per line) whose words include them."""
    wanted = set(columns)

    def ours(location: Location) -> bool:
        if not location.local or not location.path.is_file():
            return False
        try:
            text = location.path.read_bytes()[:_SNIFF].decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        lines = text.splitlines()
        if not lines:
            return False
        if wanted <= {cell.strip('"') for cell in lines[0].split(",")}:
            return True
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except ValueError:
                return False
            return bool(records) and isinstance(records[0], dict) and wanted <= records[0].keys()
        header = set(lines[0].split())
        fields = {line.split()[0] for line in lines if line.split()}
        return wanted <= header or wanted <= fields

    return ours


def _is_markdown(location: Location) -> bool:
    if not location.local or not location.path.is_file():
        return False
    if location.path.suffix.lower() in (".md", ".markdown"):
        return True
    try:
        return "<!-- kdpipe:" in location.path.read_bytes()[:_SNIFF].decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _is_png(location: Location) -> bool:
    """A PNG kdpipe drew: its tEXt ``Software`` chunk says kdpipe (:func:`png_metadata`)."""
    if not location.local or not location.path.is_file():
        return False
    data = location.path.read_bytes()[:_SNIFF]
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    at = 8
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"tEXt" and body.split(b"\0", 1) == [b"Software", PNG_SOFTWARE.encode()]:
            return True
        if kind == b"IDAT":
            return False
        at += 12 + length
    return False


def png_metadata() -> dict[str, str]:
    """What ``savefig(metadata=...)`` stamps into every PNG kdpipe draws."""
    return {"Software": PNG_SOFTWARE}


def _is_json_with(*fields: str) -> Callable[[Location], bool]:
    def ours(location: Location) -> bool:
        record = _json(location.path) if location.local and location.path.is_file() else None
        return isinstance(record, dict) and set(fields) <= record.keys()

    return ours


RUN_DIR = Output("a run directory", _is_run, folder=True)
CACHE = Output("a cache", _is_cache, folder=True)
ONNX_FILE = Output("an ONNX file kdpipe exported", _is_onnx)
MARKDOWN = Output("a Markdown file (.md, or one holding kdpipe's section markers)",
                  _is_markdown, edits=True)  # fmt: skip
PNG = Output("a PNG drawn by kdpipe", _is_png)
BENCH_WORK = Output("a bench work folder", _marked("bench", "bench-folder", "bench-detect"),
                    folder=True)  # fmt: skip


def _recipe_folder(kind: str, yaml: bool) -> Callable[[Location], bool]:
    """A dataset folder kdpipe built: its marker, or (built before markers) its RECIPE.json
    with the files' digest, and a data.yaml for a detection set only (so that neither kind
    passes for the other)."""

    def ours(where: Location) -> bool:
        if _marked(kind)(where):
            return True
        if not where.local or (where.path / "data.yaml").is_file() != yaml:
            return False
        return _is_json_with("recipe", "files_sha256")(Location(where.path / "RECIPE.json"))

    return ours


JPEG_FOLDER = Output("a JPEG folder of kdpipe jpeg-folder", _recipe_folder("jpeg-folder", False),
                     folder=True)  # fmt: skip
DETECT_SET = Output("a detection set (detect-folder)",
                    _recipe_folder("detect-folder", True), folder=True)  # fmt: skip
SHARDS = Output("a shard folder", lambda _where: False, folder=True)  # new or empty only
BIAS_RESULT = Output("a tune-bias result", _is_json_with("bias", "classes"))
REPORT_CSV = Output("a CSV table of kdpipe report", table_file("run", "group", "kind"))
STORAGE_CSV = Output("a CSV table of kdpipe storage", table_file("storage", "mean_kl"))
BENCH_CSV = Output("a CSV table of kdpipe bench", table_file("name", "value", "unit", "what"))
_CLASSIFY_REPORT, _DETECT_REPORT = table_file("run", "accuracy"), table_file("run", "map50_95")
# a classifier's report or a detector's (make detect re-evaluates with --overwrite)
EVALUATION = Output(
    "a kdpipe evaluate report",
    lambda location: _CLASSIFY_REPORT(location) or _DETECT_REPORT(location),
)


# --- what is being written, for the disk's own errors -----------------------------------------
_writing: list[Location] = []


def forget_outputs() -> None:
    """A new command starts: what earlier ones wrote is not what it writes."""
    _writing.clear()


def writing() -> list[str]:
    """The outputs this process has guarded so far, newest last: what a "No space left on
    device" without a file name was writing."""
    return [str(location) for location in _writing]
