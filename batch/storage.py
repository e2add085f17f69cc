"""Paths on any filesystem pyarrow understands: local paths, file://, s3://, gs://, hdfs://...

A location is kept as the user wrote it (a URI, or a local path made absolute) so that the
driver and every Ray worker resolve it the same way, each with its own credentials.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def normalise(location: str) -> str:
    """A URI unchanged; a local path (or file:// URI) as an absolute local path."""
    if location.startswith("file://"):
        return os.path.abspath(location[len("file://") :])
    if "://" in location:
        return location
    return os.path.abspath(location)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a normalised location."""
    if "://" not in location:
        return _local(), location
    scheme, rest = location.split("://", 1)
    authority, _, path = rest.partition("/")
    fs, base = _remote(f"{scheme}://{authority}")
    return fs, f"{base.rstrip('/')}/{path}" if path else base


def join(location: str, *names: str) -> str:
    return "/".join([location.rstrip("/"), *names])


def to_location(template: str, path: str) -> str:
    """The location of `path` on the filesystem of `template` (the inverse of `resolve`)."""
    if "://" not in template:
        return path
    scheme, rest = template.split("://", 1)
    authority = rest.partition("/")[0]
    _, base = _remote(f"{scheme}://{authority}")
    relative = path[len(base.rstrip("/")) :].lstrip("/") if path.startswith(base) else path
    return f"{scheme}://{authority}/{relative}"


@lru_cache(maxsize=1)
def _local() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


@lru_cache(maxsize=32)
def _remote(root: str) -> tuple[pafs.FileSystem, str]:
    # One filesystem object per bucket/host: building an S3 client resolves the bucket's region.
    return pafs.FileSystem.from_uri(root)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def list_files(location: str, recursive: bool = True) -> list[str]:
    """The files under a folder (recursively by default), as paths on its filesystem."""
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, recursive=recursive)
    return [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def kind(location: str) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def exists(location: str) -> bool:
    return kind(location) != pafs.FileType.NotFound


def write_parquet_atomically(table: pa.Table, location: str, **options: Any) -> None:
    """Write to a hidden temporary name beside `location`, then rename it into place.

    A reader (or a resumed job) sees the part complete or not at all. On object stores the
    rename is a copy and a delete; the object appears whole either way. `options` go to
    `pyarrow.parquet.write_table`.
    """
    fs, path = resolve(location)
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, temporary, filesystem=fs, **options)
    fs.move(temporary, path)


def write_text_atomically(text: str, location: str) -> None:
    fs, path = resolve(location)
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(text.encode())
    fs.move(temporary, path)
