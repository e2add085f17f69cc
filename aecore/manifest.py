"""The model folder: `models/<name>/<version>/{encoder.onnx,decoder.onnx,model.json,report/}`.

One place reads and writes `model.json` and checks its file hashes, for training and serving.
"""

from __future__ import annotations

import hashlib
import json
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
    found = [int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()]
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


def read(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Load `model.json`; with `verify`, check that the graph files exist and match their sha256."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"{path} not found")
    manifest = json.loads(path.read_text())
    for key in ("name", "version", "latent_dim", "input", "files", "anomaly"):
        if key not in manifest:
            raise ModelFolderError(f"{path} lacks {key!r}")
    if verify:
        files = manifest["files"]
        for part in ("encoder", "decoder"):
            graph = Path(folder) / files[part]
            if not graph.is_file():
                raise ModelFolderError(f"{graph} not found")
            expected = files.get("sha256", {}).get(part)
            actual = sha256_file(graph)
            if actual != expected:
                raise ModelFolderError(
                    f"{graph} has sha256 {actual[:12]}..., the manifest says {str(expected)[:12]}...;"
                    " re-export the model or fix model.json"
                )
    return manifest


def file_entries(folder: Path) -> dict[str, Any]:
    """The manifest's `files` block for the graphs now in `folder`."""
    names = {part: f"{part}.onnx" for part in ("encoder", "decoder")}
    hashes = {part: sha256_file(Path(folder) / name) for part, name in names.items()}
    return {**names, "sha256": hashes}


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
