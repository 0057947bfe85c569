"""Where a cache's bytes live: a local directory or a prefix in an object store, behind one small interface.

    store = open_store("s3://bucket/caches/run1", {"profile": "lab"})   # or open_store("/data/run1")
    store.write_bytes("manifest.json", data)                             # whole, or not at all
    shard = store.write_parquet("shards/00000000.parquet", table, ...)   # shard.bytes, shard.sha256
    with store.parquet_file("shards/00000000.parquet") as f: f.read_row_group(3)

Names are relative to the cache root and use "/". :class:`LocalStore` keeps the local-disk guarantees
(temp name + fsync + rename, ``flock``); :class:`FsspecStore` is any fsspec filesystem (``s3://`` through s3fs,
``gs://`` through gcsfs, ``hf://`` to read, ...), where an object is created whole by one PUT or by a multipart
upload completed only on success. Credentials come from the filesystem's usual places (environment, profile,
instance metadata) or ``storage_options``; this module never prints or stores those options.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from kd_pipeline.cache.format.files import fsync_dir, sha256_file
from kd_pipeline.errors import CacheError, ConfigError, MissingDependency

_HASH_BLOCK = 8 << 20  # bytes per ranged GET when hashing a whole object: bounded memory, few requests

# fsspec implementations whose ``pipe_file(mode="create")`` is an atomic conditional create on the server
# (s3fs: If-None-Match: *, gcsfs: ifGenerationMatch=0). fsspec's default checks exists() first, which races.
CONDITIONAL_CREATE = {"s3", "s3a", "gs", "gcs"}

# The extra that provides each protocol, for the "not installed" message.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def parse_storage_options(items: list[str] | tuple[str, ...] | None) -> dict:
    """``KEY=VALUE`` strings (``--storage-option``) as fsspec storage options. VALUE is JSON if it parses
    (``anon=true``, ``config_kwargs={...}``), else the string; ``a.b=1`` nests (``{"a": {"b": 1}}``), which is
    how a chained URL's layers get their own options (``simplecache.cache_storage=/scratch/c``)."""
    import json

    options: dict = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            # not echoed: a mistyped option may be a credential
            raise ConfigError("--storage-option expects KEY=VALUE; one was given without a key or without '='")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {key}: {parent} is given both as a value and as a group")
        target[leaf] = value
    return options


def open_store(location: str | os.PathLike, storage_options: dict | list[str] | None = None) -> Store:
    """A local directory for a path (or ``file://``), else the fsspec filesystem of the URL's protocol."""
    if isinstance(storage_options, (list, tuple)):
        storage_options = parse_storage_options(storage_options)
    text = os.fspath(location)
    if not is_url(text) or text.startswith("file://"):
        return LocalStore(Path(text.removeprefix("file://")))
    import fsspec

    # Listing caches would answer exists()/ls() from a stale snapshot while several processes coordinate
    # through the store (lease, resume); skip_instance_cache: fsspec keys its instance cache by arguments, not
    # by AWS_ENDPOINT_URL or the credentials in the environment, so a cached client could talk to the wrong place.
    options = {"use_listings_cache": False, "skip_instance_cache": True, **(storage_options or {})}
    try:
        fs, root = fsspec.core.url_to_fs(text, **options)
    except ImportError as e:
        protocol = text.split("://", 1)[0].split("::")[-1]
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'kd-pipeline[{extra}]'" if extra else f"install the fsspec package for {protocol}://"
        raise MissingDependency(f"{text}: no filesystem for {protocol}:// here ({e}); {hint}") from None
    except ValueError as e:  # unknown protocol
        raise ConfigError(f"{text}: {e}") from None
    return FsspecStore(fs, root.rstrip("/"), text.rstrip("/"), options)


@dataclass
class WrittenFile:
    bytes: int
    sha256: str


def describe_error(error: BaseException) -> str:
    """One line for a storage failure: the error's class and first line (s3fs/botocore messages name the bucket,
    key or endpoint, never the key pair), with the S3 error code when the client chained one."""
    code, cur = None, error
    while cur is not None and code is None:
        code = (getattr(cur, "response", None) or {}).get("Error", {}).get("Code")
        cur = cur.__cause__ or cur.__context__
    text = (str(error).strip().splitlines() or [""])[0][:300]
    hint = ""
    if isinstance(error, PermissionError) or code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
        hint = "; check the credentials (environment, profile or --storage-option) and the bucket's permissions"
    elif type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        hint = "; set credentials the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, instance role)"
    return f"{type(error).__name__}{f' [{code}]' if code else ''}: {text}{hint}"


# Client libraries whose own exceptions (credentials, connections: botocore's subclass no OSError) are storage
# failures too. Matched by module, so that no client library has to be imported to recognize its errors.
_CLIENT_MODULES = ("botocore.", "aiobotocore.", "aiohttp.", "google.auth.", "google.api_core.")


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed storage request (as opposed to a bug): an OSError from fsspec, s3fs, gcsfs
    or pyarrow, or a client library's own error."""
    return isinstance(error, OSError) or type(error).__module__.startswith(_CLIENT_MODULES)


@contextlib.contextmanager
def naming_storage_errors(where: str, doing: str = "cannot read") -> Iterator[None]:
    """A failed storage request as one :class:`CacheError` line naming ``where``; anything else passes."""
    try:
        yield
    except Exception as e:
        if not is_storage_failure(e):
            raise
        raise CacheError(f"{where}: {doing} ({describe_error(e)})") from None


class _HashingWriter(io.RawIOBase):
    """Write-through file object counting bytes and hashing them: a shard's sha256 without reading it back."""

    def __init__(self, target: BinaryIO):
        self._target, self._hash, self.bytes = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._target.write(view)
        self._hash.update(view)
        self.bytes += len(view)
        return len(view)

    def tell(self) -> int:
        return self.bytes

    def close(self) -> None:  # the store decides when the object is committed, not the Parquet writer
        pass

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Store:
    """A cache's root. ``url`` is what the user gave (for messages); ``member(name)`` names one file in messages."""

    url: str
    local: bool

    def member(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def __str__(self) -> str:
        return self.url

    # reading
    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def root_exists(self) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def is_folder(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in ``folder`` (not their paths), sorted; [] for a missing folder."""
        raise NotImplementedError

    def sizes(self, folder: str) -> dict[str, int]:
        """{file name: bytes} of the files directly in ``folder`` (one listing in a bucket, not a HEAD each)."""
        raise NotImplementedError

    def open_input(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def parquet_file(self, name: str):
        """A context manager: the shard opened as a ``pq.ParquetFile`` for row-group reads, closed after."""
        raise NotImplementedError

    def sha256(self, name: str) -> str:
        raise NotImplementedError

    def identity(self, name: str) -> tuple:
        """What changes when ``name`` is replaced or rewritten (FileNotFoundError if it is gone)."""
        raise NotImplementedError

    def local_dir(self, folder: str) -> Path:
        """A local directory with ``folder``'s files (the tokenizer: transformers loads from a path)."""
        raise NotImplementedError

    # writing: each call makes its object visible whole or not at all
    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def write_parquet(self, name: str, table: pa.Table, **write_options) -> WrittenFile:
        """Object stores; a local cache's shards go through files.write_shard (temp + fsync + rename)."""
        raise NotImplementedError

    def put_dir(self, local: Path, folder: str) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def delete_tree(self, folder: str) -> None:
        raise NotImplementedError

    def clean_interrupted(self, mine=lambda name: True) -> list[str]:
        """Remove what an interrupted writer left that no manifest can list (temp files, multipart uploads)
        under the names for which ``mine(name)`` holds (another worker's upload may be in flight); return what
        was removed."""
        raise NotImplementedError

    def lock(self, name: str, what: str, enabled: bool = True):
        """One writer: a context manager that refuses at once (:class:`~kd_pipeline.errors.LockHeld`) while
        another holds ``name``. Yields an object with ``check()``: raises if the lock was lost meanwhile."""
        raise NotImplementedError


class _NoCheck:
    def check(self) -> None:
        pass


class LocalStore(Store):
    """A directory on a local or network file system: the behaviour and bytes of the format before stores."""

    local = True

    def __init__(self, root: Path):
        self.root, self.url = Path(root), str(root)

    def member(self, name: str) -> str:
        return str(self.root / name) if name else str(self.root)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def root_exists(self) -> bool:
        return self.root.is_dir()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def is_folder(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def list(self, folder: str = "") -> list[str]:
        d = self.root / folder
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def sizes(self, folder: str) -> dict[str, int]:
        d = self.root / folder
        return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.is_dir() else {}

    def open_input(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def parquet_file(self, name: str):
        # Small reads instead of pre-buffering the whole row group's column chunks at once.
        return pq.ParquetFile(self.root / name, pre_buffer=False, buffer_size=1 << 20)  # closes its own file

    def sha256(self, name: str) -> str:
        return sha256_file(self.root / name)

    def identity(self, name: str) -> tuple:
        st = (self.root / name).stat()
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def local_dir(self, folder: str) -> Path:
        return self.root / folder

    def write_bytes(self, name: str, data: bytes) -> None:
        from kd_pipeline.cache.format.files import atomic_write_bytes

        atomic_write_bytes(self.root / name, data)

    def put_dir(self, local: Path, folder: str) -> None:
        final = self.root / folder
        tmp = self.root / f".{folder}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        tmp.rename(final)
        fsync_dir(self.root)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_tree(self, folder: str) -> None:
        shutil.rmtree(self.root / folder, ignore_errors=True)

    def clean_interrupted(self, mine=lambda name: True) -> list[str]:
        removed = []  # temp names carry no block number: as before stores, every stray temp file goes
        for directory in (self.root, self.root / "shards"):
            for tmp in directory.glob(".*.tmp*"):
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
                removed.append(str(tmp))
        return removed

    @contextlib.contextmanager
    def lock(self, name: str, what: str, enabled: bool = True):
        from kd_pipeline.cache.format.lock import hold_lock

        if not enabled:
            yield _NoCheck()
            return
        with hold_lock(self.root / name, what):
            yield _NoCheck()


class FsspecStore(Store):
    """An fsspec filesystem under a root prefix. Objects are created whole: the shard's commit is the manifest
    written after it (cache/build.py), so an object no manifest lists is ignored and replaced."""

    local = False

    def __init__(self, fs, root: str, url: str, options: dict | None = None):
        self._fs, self._pid, self._options = fs, os.getpid(), options or {}
        self.root, self.url = root, url
        self._local_dirs: dict[str, Path] = {}
        self._footers: dict[str, pq.FileMetaData] = {}  # per shard, a few KiB: one GET fewer per row group read

    @property
    def fs(self):
        """The filesystem, made anew in a forked child (DataLoader workers): fsspec's async clients (s3fs, gcsfs)
        refuse to run in a process forked after they started ("This class is not fork-safe")."""
        if self._pid != os.getpid():
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.url, **self._options)[0]
            self._pid = os.getpid()
        return self._fs

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol[0] if isinstance(protocol, (tuple, list)) else protocol

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def root_exists(self) -> bool:
        """Whether anything is under the root. Wrong credentials raise (one line, by the caller), and so does a
        missing bucket, rather than look like a missing cache; only the prefix is listed when it exists (a
        reader may be allowed to list its prefix only)."""
        try:
            return bool(self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            if self.protocol in _EXTRAS:  # the bucket's own listing raises "bucket does not exist"
                self.fs.ls(self.root.split("/", 1)[0], detail=False)
            return False

    def size(self, name: str) -> int:
        return self.fs.size(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def is_folder(self, name: str) -> bool:
        return bool(self.list(name))  # an object store has no empty folders

    def list(self, folder: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

    def sizes(self, folder: str) -> dict[str, int]:
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}

    def open_input(self, name: str) -> BinaryIO:
        # No read-ahead cache: the default "readahead" cache fetches up to a 50 MiB block per seek, most of a
        # shard for one row group (bench/s3 notes). pyarrow asks for exactly the ranges it needs.
        return self.fs.open(self.path(name), "rb", cache_type="none")

    @contextlib.contextmanager
    def parquet_file(self, name: str) -> Iterator[pq.ParquetFile]:
        # pre_buffer: one coalesced ranged GET per row group (its column chunks) instead of one per column page.
        # The footer is read once per shard and kept: objects of a committed cache never change in place (a
        # replaced shard has another sha256, which the reader checks before its first row group).
        with self.open_input(name) as source:  # ParquetFile does not close a file object it was given
            f = pq.ParquetFile(source, pre_buffer=True, metadata=self._footers.get(name))
            self._footers.setdefault(name, f.metadata)
            yield f

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(name), "rb", cache_type="none") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
        return h.hexdigest()

    def identity(self, name: str) -> tuple:
        info = self.fs.info(self.path(name))  # one HEAD (s3fs), as the open that follows makes anyway
        version = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash") if info.get(k)), None)
        modified = next((info[k] for k in ("LastModified", "updated", "mtime") if info.get(k)), None)
        return info.get("size"), str(version), str(modified)

    def local_dir(self, folder: str) -> Path:
        if folder not in self._local_dirs:
            local = Path(tempfile.mkdtemp(prefix="kd-cache-"))
            atexit.register(shutil.rmtree, local, True)
            for name in self.list(folder):
                (local / name).write_bytes(self.read_bytes(f"{folder}/{name}"))
            self._local_dirs[folder] = local
        return self._local_dirs[folder]

    def write_bytes(self, name: str, data: bytes) -> None:
        # One PUT below 2 x s3fs's 50 MiB chunk: readers see the old or the new object, never a mix.
        self.fs.pipe_file(self.path(name), data)

    def write_parquet(self, name: str, table: pa.Table, **write_options) -> WrittenFile:
        # autocommit=False: parts upload as s3fs's buffer fills, and the object appears only at commit(). A
        # plain `with fs.open(..., "wb")` would COMMIT a partial object when an exception leaves the block.
        f = self.fs.open(self.path(name), "wb", autocommit=False)
        try:
            sink = _HashingWriter(f)
            pq.write_table(table, sink, **write_options)
            f.close()
            f.commit()
        except BaseException:
            f.discard()
            f.closed = True  # else __del__ closes it again: a new multipart upload (s3fs), and a hang at exit
            raise
        return WrittenFile(bytes=sink.bytes, sha256=sink.sha256)

    def put_dir(self, local: Path, folder: str) -> None:
        for file in sorted(Path(local).iterdir()):
            if file.is_file():
                self.fs.pipe_file(self.path(f"{folder}/{file.name}"), file.read_bytes())

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def delete_tree(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(folder), recursive=True)

    def clean_interrupted(self, mine=lambda name: True) -> list[str]:
        """Abort the multipart uploads a killed writer left under this cache (S3: they hold storage, and are
        invisible to readers). Stores without them have nothing to clean."""
        list_uploads = getattr(self.fs, "list_multipart_uploads", None)
        if list_uploads is None:
            return []
        bucket, _, prefix = self.root.partition("/")
        removed = []
        for upload in list_uploads(bucket):
            key = upload["Key"]
            if key.startswith(prefix + "/") and mine(key[len(prefix) + 1 :]):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                removed.append(f"{self.protocol}://{bucket}/{key} (multipart upload {upload['UploadId'][:12]}…)")
        return removed

    @contextlib.contextmanager
    def lock(self, name: str, what: str, enabled: bool = True):
        if not enabled:
            yield _NoCheck()
            return
        if self.protocol not in CONDITIONAL_CREATE:
            raise CacheError(
                f"{self.url}: {self.protocol}:// offers no conditional write here, so two writers of this cache could "
                "not be kept apart; write one at a time and pass --no-lock, or use s3:// / gs:// or a local directory"
            )
        from kd_pipeline.cache.format.lock import hold_lease

        with hold_lease(self, name, what) as lease:
            yield lease
