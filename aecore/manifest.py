"""The model folder: `models/<name>/<version>/{encoder.onnx,decoder.onnx,model.json,report/}`.

One place reads and writes `model.json` and checks its file hashes, for training and serving.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "model.json"


class ModelFolderError(RuntimeError):
    """A model folder is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(model_root: Path) -> list[int]:
    """The positive integer versions under `models/<name>/`, ascending."""
    if not model_root.is_dir():
        return []
    found = [
        int(p.name)
        for p in model_root.iterdir()
        if p.is_dir() and p.name.isascii() and p.name.isdigit()
    ]
    return sorted(v for v in found if v > 0)


def resolve(model_dir: Path, name: str, version: int | None = None) -> Path:
    """The folder of `name` at `version`, or at its highest version when none is given."""
    root = Path(model_dir) / name
    available = versions(root)
    if not available:
        raise ModelFolderError(f"no versions of model {name!r} under {root}")
    if version is None:
        version = available[-1]
    if version not in available:
        raise ModelFolderError(f"model {name!r} has no version {version}; found {available}")
    return root / str(version)


# What a manifest without `tasks` (every version before tasks existed) serves.
AUTOENCODER_TASKS = ("encode", "decode", "reconstruct", "anomaly-score", "interpolate")


def tasks(body: dict[str, Any]) -> list[str]:
    """The endpoints a model serves, e.g. ["denoise"]; old manifests serve the autoencoder's."""
    return list(body.get("tasks", AUTOENCODER_TASKS))


def graph_files(body: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest lists, by part (`encoder`, `decoder`, `denoiser`, ...)."""
    return {part: name for part, name in body["files"].items() if part != "sha256"}


def precision_parts(body: dict[str, Any], precision: str) -> dict[str, str]:
    """The `files` parts holding the encoder and decoder graphs of `precision` (`fp32`, `fp16`).

    Versions exported before fp16 existed have fp32 graphs only.
    """
    default = {"fp32": {"encoder": "encoder", "decoder": "decoder"}}
    precisions = body.get("precisions", default)
    if precision not in precisions:
        raise ModelFolderError(
            f"model {body.get('name')!r} v{body.get('version')} has no {precision} graphs "
            f"(it has {sorted(precisions)}); export it again to get them"
        )
    return {graph: precisions[precision][graph] for graph in ("encoder", "decoder")}


def read(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Load `model.json`; with `verify`, check that every listed file exists and matches its sha256."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"{path} not found")
    try:
        body = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from None
    required = ["name", "version", "input", "files"]
    if set(tasks(body)) & set(AUTOENCODER_TASKS):
        required += ["latent_dim", "anomaly"]
    for key in required:
        if key not in body:
            raise ModelFolderError(f"{path} lacks {key!r}")
    if set(tasks(body)) & set(AUTOENCODER_TASKS):
        for part in ("encoder", "decoder"):
            if part not in body["files"]:
                raise ModelFolderError(f"{path} lists no {part} file")
    if verify:
        hashes = body["files"].get("sha256", {})
        for part, name in graph_files(body).items():
            file = Path(folder) / name
            if not file.is_file():
                raise ModelFolderError(f"{file} not found")
            expected, actual = hashes.get(part), sha256_file(file)
            if actual != expected:
                raise ModelFolderError(
                    f"{file} has sha256 {actual[:12]}..., the manifest says {str(expected)[:12]}...;"
                    " re-export the model or fix model.json"
                )
    return body


def file_entries(folder: Path, parts: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest's `files` block for `parts` (default: the encoder and decoder graphs)."""
    names = parts or {part: f"{part}.onnx" for part in ("encoder", "decoder")}
    hashes = {part: sha256_file(Path(folder) / name) for part, name in names.items()}
    return {**names, "sha256": hashes}


def write(folder: Path, body: dict[str, Any]) -> Path:
    """Write `model.json` atomically (a reader sees the old file or the new one, never half)."""
    path = Path(folder) / MANIFEST
    partial = path.with_name(f".{MANIFEST}.partial")
    partial.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    partial.replace(path)
    return path


def next_version(model_root: Path) -> int:
    existing = versions(model_root)
    return existing[-1] + 1 if existing else 1


def new_version(model_root: Path, version: int | None = None) -> tuple[int, Path]:
    """The version to publish next under `model_root` (or `version`, which must be free) and
    its fresh staging folder."""
    version = version or next_version(model_root)
    if (Path(model_root) / str(version)).exists():
        raise FileExistsError(f"{Path(model_root) / str(version)} exists; choose another --version")
    return version, staging_folder(model_root, version)


def stage_copy(source: Path, version: int | None = None) -> tuple[Path, Path, int]:
    """A new version derived from `source`: (its staging folder, holding a copy of `source`'s
    files, the model root, the version it becomes). `source` itself is never touched."""
    source = Path(source)
    version, staging = new_version(source.parent, version)
    shutil.copytree(source, staging, dirs_exist_ok=True)
    return staging, source.parent, version


def staging_folder(model_root: Path, version: int) -> Path:
    """A hidden `.N.partial` folder beside the versions; servers never load such a name."""
    staging = Path(model_root) / f".{version}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, model_root: Path, version: int) -> Path:
    """Publish a complete staging folder as `model_root/version` by one rename.

    A version, once published, never changes: a later change is published as a new version.
    """
    folder = Path(model_root) / str(version)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; a published version never changes")
    read(staging, verify=True)  # never publish a folder that would not load
    Path(staging).rename(folder)
    return folder
