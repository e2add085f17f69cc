"""What every benchmark section shares: paths, the machine record, timing, tables, JSON."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aecore.machine import machine  # noqa: F401  (re-exported for the bench scripts)

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "tests" / "fixtures" / "scenes"
RESULTS = Path(__file__).resolve().parent / "results"


def model_folder() -> Path:
    """The folder the service would serve: AE_MODEL_DIR/AE_MODEL_NAME/AE_MODEL_VERSION or highest."""
    from aecore import manifest

    version = os.environ.get("AE_MODEL_VERSION")
    return manifest.resolve(
        Path(os.environ.get("AE_MODEL_DIR", REPO / "models")),
        os.environ.get("AE_MODEL_NAME", "intel-scenes"),
        int(version) if version else None,
    ).resolve()


def model_record(folder: Path) -> dict[str, Any]:
    from aecore import manifest

    card = manifest.read(folder, verify=False)
    return {
        "folder": str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder),
        "name": card.get("name"),
        "version": card.get("version"),
        "architecture": card.get("architecture"),
        "created": card.get("created"),
        "latent_dim": card.get("latent_dim"),
        "input": [card["input"].get(k) for k in ("height", "width", "channels")],
        "sha256": card.get("files", {}).get("sha256"),
    }


def scene_jpegs() -> list[Path]:
    paths = sorted(SCENES.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no fixture JPEGs under {SCENES}")
    return paths


def request_jpeg() -> Path:
    """The one real JPEG every single-image request sends (and whose decode time is baseline)."""
    return scene_jpegs()[0]


@dataclass
class Timing:
    times: np.ndarray  # seconds per timed call
    cpu: float  # CPU seconds this process used over the timed calls, all threads

    def stats(self, items_per_call: int) -> dict[str, float]:
        items = items_per_call * len(self.times)
        return {
            "img_per_s": round(items / float(self.times.sum()), 2),
            "ms_per_call_p50": round(float(np.median(self.times)) * 1000, 3),
            "ms_per_call_min": round(float(self.times.min()) * 1000, 3),
            "cpu_ms_per_img": round(1000 * self.cpu / items, 3),
            "calls": len(self.times),
        }


def repeat(fn: Callable[[], object], seconds: float, min_calls: int = 5, warmup: int = 2) -> Timing:
    """Call `fn` until `seconds` have passed and at least `min_calls` were made (after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return Timing(np.asarray(times), time.process_time() - cpu)


def cell(value: Any) -> str:
    """One figure as every table shows it: one decimal from 10 up, two below, '-' for none."""
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return "-" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str) -> str:
    """A plain-text table of `rows`: columns are (key, header) pairs."""
    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def arguments(
    description: str,
    default_seconds: float,
    flags: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
    valued: dict[str, str | None] | None = None,
) -> argparse.Namespace:
    """The options every section takes: where to write its JSON, and how long to time things
    (plus a section's own on/off `flags`, its options of a few `choices` each, the first
    being the default, and its options that take any value, None marking a required one)."""
    parser = argparse.ArgumentParser(description=description)
    for flag in flags:
        parser.add_argument(flag, action="store_true")
    for option, values in (choices or {}).items():
        parser.add_argument(option, choices=values, default=values[0], help=f"default {values[0]}")
    for option, default in (valued or {}).items():
        parser.add_argument(option, default=default, required=default is None)
    parser.add_argument("--json", type=Path, help="write this section's results here")
    parser.add_argument(
        "--seconds",
        type=float,
        default=default_seconds,
        help=f"timing per measurement (default {default_seconds:g}); small values smoke-test",
    )
    return parser.parse_args()


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
