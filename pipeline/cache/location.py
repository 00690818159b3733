"""Where a cache lives: a local folder, or any fsspec URL (``s3://bucket/key``, ``gs://``...).

zarr opens either itself (a local path, or an fsspec URL through its
``FsspecStore``); this class does the rest of what the cache needs beside
zarr: does a key exist, read a small file, list the arrays, delete the store,
and flush a file to the disk. Remote filesystems are configured the fsspec
way: credentials and endpoints from the usual environment variables (for S3,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or
fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``).

Durability: locally each chunk file and its folder are fsync'ed before the
chunk's progress flag is written. On an object store a PUT is durable when it
returns, and zarr writes synchronously, so the flag's PUT follows the data's:
the crash-safety rule (a flag only for a durable chunk) holds on both.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Location:
    """A cache's root: ``str(location)`` is what the user gave (a path or a URL)."""

    def __init__(self, where: str | Path | Location) -> None:
        if isinstance(where, Location):
            where = where.url
        self.url = str(where)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.url = str(Path(self.url.removeprefix("file://")))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def zarr_path(self) -> str:
        """What ``zarr.open_group`` takes: the local path, or the URL."""
        return self.url

    @property
    def path(self) -> Path:
        """The local folder (only for a local cache)."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local path")
        return Path(self.url)

    def key(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache()  # zarr wrote through its own client: listings may be stale
        return bool(self.fs.exists(self.key(*parts)))

    def is_file(self, *parts: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.isfile(self.key(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        """The file's content; FileNotFoundError when it is not there."""
        return self.fs.cat_file(self.key(*parts))

    def children(self) -> list[str]:
        """Names of the entries directly under the root (the arrays, ``zarr.json``)."""
        self.fs.invalidate_cache()
        return sorted(
            entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)
        )

    def remove(self) -> None:
        """Delete the store (a folder, or every object under the prefix)."""
        if self.local and self.path.is_file():
            self.path.unlink()
        else:
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()

    def sync(self, *parts: str) -> None:
        """Flush a file, then its folder (a new file's name is data too), to the disk; on an
        object store a completed PUT is durable already."""
        if not self.local:
            return
        path = Path(self.key(*parts))
        for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
            descriptor = os.open(target, flags)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
