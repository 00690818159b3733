"""Strict parsing of kdpipe's JSON records: the cache manifest, the model card, config.json.

One set of rules for every record a reader trusts: unknown keys and missing keys are
errors, and so is a value of the wrong type (a boolean is never a number). Every
message names the record (``where``) and the field.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from kdpipe.base.errors import ManifestError


def check_object(data: Any, where: str) -> dict:
    """``data`` itself must be a JSON object."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    return data


def check_keys(data: dict, cls: type, where: str, *, require: bool = True) -> None:
    """No key outside ``cls``'s fields; with ``require``, every field without a default
    present (without it, :func:`check_field` names a missing one as it reads it)."""
    names = {f.name for f in fields(cls)}
    optional = {f.name for f in fields(cls) if f.default is not MISSING}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data) - optional) if require else []
    problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
    problems += [f"missing field(s) {', '.join(missing)}"] if missing else []
    if problems:
        raise ManifestError(f"{where}: {'; '.join(problems)}")


def check_field(data: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[name]``, which must exist and be of ``kind``."""
    if name not in data:
        raise ManifestError(f"{where}: missing field {name!r}")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a count or a temperature must not be True
    if isinstance(value, bool) and bool not in kinds:
        raise ManifestError(f"{where}: field {name!r} must be {kind}, not a boolean")
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: field {name!r} has type {type(value).__name__}")
    return value
