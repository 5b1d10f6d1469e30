"""Datasets that do not ship inside a package: where they are looked for, and how they are
fetched and checked.

A dataset is found, in this order:
1. at the path the user gives (`--set model.data=PATH`): the official archive or the folder
   it extracts to, taken as it is (the user chose it; no download, no checksum);
2. in the cache folder, `$DIFFUSIONBLOCKS_DATA` or else ~/.cache/diffusionblocks/data;
3. downloaded once into that cache, from the dataset's official address.

What comes from the cache or a download is checked against its published checksum the
first time it is used (a `.verified` marker beside it records that it passed, so a
160 MB archive is not hashed on every start). `DIFFUSIONBLOCKS_OFFLINE=1` forbids
downloads. A dataset that is absent and cannot be downloaded raises `DataMissing`, one line
that says what to download and where to put it; the CLI turns it into exit status 2."""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Source:
    name: str          # what the user reads: "CIFAR-10"
    filename: str      # the official archive's file name, kept in the cache
    url: str
    digest: str        # hex digest of the archive (or of `member`, where set)
    algorithm: str     # "md5" or "sha256", as published
    member: str = ""   # a zip member whose content the digest is of ("" = the archive itself)


SOURCES = {
    "cifar10": Source("CIFAR-10", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a", "md5"),
    "cifar100": Source("CIFAR-100", "cifar-100-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85", "md5"),
    # The digest usually quoted for text8 is of the 100,000,000 extracted bytes, not of the zip.
    "text8": Source("text8", "text8.zip", "http://mattmahoney.net/dc/text8.zip",
                    "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7", "sha256", member="text8"),
}


class DataMissing(ConfigError):
    """A dataset that is not on this machine and cannot be downloaded."""


class ChecksumError(ConfigError):
    """A cached or downloaded file whose checksum is not the published one."""


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSIONBLOCKS_DATA") or Path.home() / ".cache" / "diffusionblocks" / "data")


def offline() -> bool:
    return os.environ.get("DIFFUSIONBLOCKS_OFFLINE", "") not in ("", "0")


def digest_of(path: Path, source: Source) -> str:
    """The hex digest of the archive, or of its `member` inside a zip."""
    hasher = hashlib.new(source.algorithm)
    if source.member:
        import zipfile

        with zipfile.ZipFile(path) as archive, archive.open(source.member) as stream:
            while block := stream.read(CHUNK):
                hasher.update(block)
    else:
        with open(path, "rb") as stream:
            while block := stream.read(CHUNK):
                hasher.update(block)
    return hasher.hexdigest()


def verify(path: Path, source: Source) -> None:
    """Raises ChecksumError unless `path` has the published digest (once per file: a marker
    beside it remembers a pass)."""
    marker = path.with_name(path.name + ".verified")
    if marker.exists() and marker.stat().st_mtime >= path.stat().st_mtime:
        return
    try:
        found = digest_of(path, source)
    except (OSError, KeyError, ValueError) as error:  # a truncated or foreign file
        found = f"unreadable ({error})"
    if found != source.digest:
        raise ChecksumError(f"model.data: {path} is not the official {source.name} file ({source.algorithm} "
                            f"{found}, expected {source.digest}); delete it and run again to download it afresh, "
                            f"or fetch {source.url} yourself")
    marker.touch()


def missing(source: Source, why: str) -> DataMissing:
    return DataMissing(f"model.data: {source.name} is not on this machine ({why}); download {source.url} "
                       f"into {cache_dir()}/ or pass --set model.data=PATH to the archive or its extracted folder")


def download(source: Source, target: Path) -> None:
    """Fetches the archive into `target` (through a temporary name, so a cut download never
    looks complete), with a progress bar."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(source.url, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {source.filename}") as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise missing(source, f"the download failed: {getattr(error, 'reason', error)}") from None
    partial.replace(target)


def locate(name: str, path: str = "") -> Path:
    """The file or folder that holds dataset `name` (a key of SOURCES): `path` if given, else
    the verified cached archive, downloading it first if it is not there."""
    source = SOURCES[name]
    if path:
        given = Path(path).expanduser()
        if not given.exists():
            raise DataMissing(f"model.data: no such file or folder {path!r}")
        return given
    cached = cache_dir() / source.filename
    if not cached.exists():
        if offline():
            raise missing(source, "DIFFUSIONBLOCKS_OFFLINE is set")
        download(source, cached)
    verify(cached, source)
    return cached

