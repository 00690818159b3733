"""The soft-label cache: format (manifest), writer and reader."""

from pipeline.cache.format import (
    FORMAT_VERSION,
    Manifest,
    TeacherMember,
    derive_cache_id,
    derive_teacher_id,
)
from pipeline.cache.store import (
    CacheWriter,
    SoftLabels,
    load_soft_labels,
    open_complete,
    read_manifest,
    retemper,
)

__all__ = [
    "FORMAT_VERSION",
    "CacheWriter",
    "Manifest",
    "SoftLabels",
    "TeacherMember",
    "derive_cache_id",
    "derive_teacher_id",
    "load_soft_labels",
    "open_complete",
    "read_manifest",
    "retemper",
]
