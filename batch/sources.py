"""What a batch job reads, split into parts: the unit of work, of output files and of resuming.

Sources: a folder tree (class = first-level subfolder, `aecore.folders`' rule, as training
reads it), a glob, a text file of paths (one per line, optionally `<TAB>class`; relative paths
are relative to the list's folder), or Parquet (a file or a folder of them) with an image-bytes
column. Image files are cut into parts of `part_size` in a stable order; a Parquet row group is
one part. A part's name carries a digest of the paths (or row group) it reads, so adding or
removing files gives new parts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aecore.folders import class_layout
from batch import storage

KINDS = ("folder", "glob", "list", "parquet")
GLOB_CHARS = "*?["


class SourceError(ValueError):
    """The input cannot be read or holds no images."""


@dataclass(frozen=True)
class ParquetColumns:
    image: str = "image"
    path: str | None = None  # default: "path" when the file has it, else <file>#<row>
    label: str | None = None  # default: "class" when the file has it


@dataclass
class Part:
    """One unit of work: image locations (with classes), or one row group of a Parquet file."""

    index: int
    images: int
    paths: list[str] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    parquet: str | None = None
    row_group: int | None = None
    columns: dict | None = None

    @property
    def name(self) -> str:
        what = json.dumps([self.paths, self.classes, self.parquet, self.row_group, self.columns])
        digest = hashlib.sha256(what.encode()).hexdigest()[:12]
        return f"part-{self.index:05d}-{digest}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Part:
        return cls(**json.loads(text))


def detect_kind(source: str) -> str:
    """folder, glob, list or parquet, from what `source` is."""
    if any(c in source for c in GLOB_CHARS):
        return "glob"
    found = storage.kind(source)
    if found == pafs.FileType.NotFound:
        raise SourceError(f"{source} does not exist")
    if source.rstrip("/").endswith(".parquet"):
        return "parquet"
    return "folder" if found == pafs.FileType.Directory else "list"


def plan(
    source: str,
    kind: str | None = None,
    part_size: int = 256,
    columns: ParquetColumns | None = None,
) -> list[Part]:
    """The parts of a job over `source` (normalised with `storage.normalise`)."""
    kind = kind or detect_kind(source)
    if kind == "parquet":
        return _parquet_parts(source, columns or ParquetColumns())
    if kind == "folder":
        paths, classes = _folder(source)
    elif kind == "glob":
        paths, classes = _glob(source)
    elif kind == "list":
        paths, classes = _list(source)
    else:
        raise SourceError(f"unknown input kind {kind!r}; one of {KINDS}")
    if not paths:
        raise SourceError(f"no image files in {source} ({kind})")
    return [
        Part(index=i, images=len(paths[s : s + part_size]), paths=paths[s : s + part_size],
             classes=classes[s : s + part_size])
        for i, s in enumerate(range(0, len(paths), part_size))
    ]  # fmt: skip


def _folder(source: str) -> tuple[list[str], list[str | None]]:
    root = storage.resolve(source)[1].rstrip("/")
    listing = [p[len(root) + 1 :] for p in storage.list_files(source)]
    names, classes = class_layout(listing)
    paths = [storage.join(source, name) for name in names]
    return paths, list(classes) if classes is not None else [None] * len(paths)


def _glob(source: str) -> tuple[list[str], list[str | None]]:
    """Files matching the pattern; `*` matches across folders too (fnmatch, not shell rules)."""
    fs, pattern = storage.resolve(source)
    cut = min(pattern.find(c) for c in GLOB_CHARS if c in pattern)
    base = pattern[:cut].rpartition("/")[0] or "/"
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    found = sorted(
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path, pattern)
    )
    paths = [storage.to_location(source, p) for p in found]
    return paths, [None] * len(paths)


def _list(source: str) -> tuple[list[str], list[str | None]]:
    folder = source.rstrip("/").rpartition("/")[0]
    paths: list[str] = []
    classes: list[str | None] = []
    for line in storage.read_bytes(source).decode().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, _, label = line.rstrip("\r\n").partition("\t")
        if "://" in path or path.startswith("/"):
            paths.append(storage.normalise(path))
        else:
            paths.append(storage.join(folder, path))
        classes.append(label or None)
    return paths, classes


def _parquet_parts(source: str, columns: ParquetColumns) -> list[Part]:
    fs, path = storage.resolve(source)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        files = sorted(p for p in storage.list_files(source) if p.endswith(".parquet"))
        files = [storage.to_location(source, p) for p in files]
    else:
        files = [source]
    parts = []
    for file in files:
        file_fs, file_path = storage.resolve(file)
        metadata = pq.ParquetFile(file_path, filesystem=file_fs).metadata
        names = set(metadata.schema.names)
        if columns.image not in names:
            raise SourceError(
                f"{file} has no image column {columns.image!r}; it has {sorted(names)}"
            )
        chosen = {
            "image": columns.image,
            "path": columns.path or ("path" if "path" in names else None),
            "label": columns.label or ("class" if "class" in names else None),
        }
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            parts.append(
                Part(index=len(parts), images=rows, parquet=file, row_group=group, columns=chosen)
            )
    if not parts:
        raise SourceError(f"no Parquet files in {source}")
    return parts
