"""The soft-label cache: format (manifest), storage layouts, writer and readers.

This is the package's only import surface: code outside ``pipeline.cache`` imports
from here, never from its modules. It knows nothing about models.

- ``format``: the manifest and the ids derived from it, apart from any I/O;
- ``layout``: how the teacher's distribution is stored (dense, top-k), one object each;
- ``store``: the writer (chunk by chunk, resumable, completion last) and the whole-cache
  reader; ``stream``: the reader of a cache larger than memory;
- ``location``: a local folder or an fsspec URL.
"""

from pipeline.cache.format import (
    CHECKSUM_KEY,
    COMBINE_RULES,
    FORMAT_VERSION,
    IDENTITY_VIEW,
    MANIFEST_KEY,
    PRECISIONS,
    PREPROCESSING,
    STATUS_COMPLETE,
    STATUS_WRITING,
    TEMPERATURE_RANGE,
    VALUES,
    VIEW_COLUMNS,
    VIEW_FIELDS,
    Manifest,
    TeacherMember,
    Upstream,
    array_specs,
    derive_cache_id,
    derive_teacher_id,
    describe_differences,
    manifest_checksum,
    temperature_problem,
)
from pipeline.cache.layout import Dense, Layout, TopK, index_dtype, layout_for, reconstruct_top_k
from pipeline.cache.location import Location
from pipeline.cache.store import (
    DIGEST_BYTES,
    DIGESTS,
    PROGRESS,
    CacheWriter,
    Positions,
    SoftLabels,
    array_codecs,
    check_array_metadata,
    chunk_digest,
    chunk_key,
    load_soft_labels,
    open_complete,
    read_manifest,
    retemper,
    utc_now,
)
from pipeline.cache.stream import (
    StreamedRows,
    StreamedSoftLabels,
    chunk_plan,
    decoded_bytes,
    open_soft_labels,
    smallest_budget,
    windowed_order,
)

__all__ = [
    "CHECKSUM_KEY",
    "COMBINE_RULES",
    "DIGESTS",
    "DIGEST_BYTES",
    "FORMAT_VERSION",
    "IDENTITY_VIEW",
    "MANIFEST_KEY",
    "PRECISIONS",
    "PREPROCESSING",
    "PROGRESS",
    "STATUS_COMPLETE",
    "STATUS_WRITING",
    "TEMPERATURE_RANGE",
    "VALUES",
    "VIEW_COLUMNS",
    "VIEW_FIELDS",
    "CacheWriter",
    "Dense",
    "Layout",
    "Location",
    "Manifest",
    "Positions",
    "SoftLabels",
    "StreamedRows",
    "StreamedSoftLabels",
    "TeacherMember",
    "TopK",
    "Upstream",
    "array_codecs",
    "array_specs",
    "check_array_metadata",
    "chunk_digest",
    "chunk_key",
    "chunk_plan",
    "decoded_bytes",
    "derive_cache_id",
    "derive_teacher_id",
    "describe_differences",
    "index_dtype",
    "layout_for",
    "load_soft_labels",
    "manifest_checksum",
    "open_complete",
    "open_soft_labels",
    "read_manifest",
    "reconstruct_top_k",
    "retemper",
    "smallest_budget",
    "temperature_problem",
    "utc_now",
    "windowed_order",
]
