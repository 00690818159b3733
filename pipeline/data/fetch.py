"""Put Fashion-MNIST into ``data/fashion-mnist/`` and prove it is the right data.

Two sources: Debian's ``dataset-fashion-mnist`` package (``apt-get download``
and ``dpkg-deb -x``, no root needed), then the official download URLs. Debian
recompresses the gzip files, so their bytes differ from upstream's; the
checksums below are SHA-256 digests of the *decompressed* IDX payloads, which
are the same whichever source the files came from.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from kdpipe.base.errors import DatasetError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = "usr/share/datasets/fashion-mnist"
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# file name -> (sha256 of the decompressed IDX bytes, decompressed size)
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}


def payload_sha256(path: Path) -> str | None:
    """SHA-256 of a gzip file's decompressed content, or None if it is unreadable."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except (OSError, EOFError):
        return None
    return digest.hexdigest()


def verify(folder: Path) -> list[str]:
    """The names of the files in ``folder`` that are missing or whose checksum is wrong."""
    return [
        name
        for name, (sha256, _) in FASHION_MNIST_SHA256.items()
        if payload_sha256(folder / name) != sha256
    ]


def _from_debian(workdir: Path) -> Path:
    subprocess.run(
        ["apt-get", "download", DEBIAN_PACKAGE],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (deb,) = workdir.glob(f"{DEBIAN_PACKAGE}_*.deb")
    subprocess.run(
        ["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True, capture_output=True
    )
    return workdir / "root" / DEBIAN_FOLDER


def _from_official(workdir: Path) -> Path:
    for name in FASHION_MNIST_SHA256:
        with urllib.request.urlopen(OFFICIAL_URL + name, timeout=60) as response:
            (workdir / name).write_bytes(response.read())
    return workdir


def fetch_fashion_mnist(dest: Path, *, log=print) -> Path:
    """Make ``dest`` hold the four verified Fashion-MNIST files; a no-op when it already does."""
    dest = Path(dest)
    missing = verify(dest)
    if not missing:
        log(f"{dest}: Fashion-MNIST present, checksums verified")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    failures = []
    for source, fetch in (("Debian package", _from_debian), ("official URLs", _from_official)):
        with tempfile.TemporaryDirectory(prefix="kdpipe-fetch-") as tmp:
            try:
                folder = fetch(Path(tmp))
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                failures.append(f"{source}: {exc}")
                continue
            bad = verify(folder)
            if bad:
                failures.append(f"{source}: wrong checksum for {', '.join(bad)}")
                continue
            for name in FASHION_MNIST_SHA256:
                # copy to a temporary name, then rename: a half-copied file never
                # stands under the real name
                partial = dest / f".{name}.partial"
                shutil.copyfile(folder / name, partial)
                partial.replace(dest / name)
            log(f"{dest}: Fashion-MNIST fetched from the {source}, checksums verified")
            return dest
    raise DatasetError("could not fetch Fashion-MNIST: " + "; ".join(failures))
