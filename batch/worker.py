"""The Ray Data actor: one model's sessions, run over whole parts, each written as one file.

A part's images are read from their filesystem, preprocessed with the service's pipeline
(`Autoencoder.preprocess` = `aecore.preprocessing.load_image`), run through the graphs in
batches, scored with the manifest's calibrated scorer, and written atomically. A file that
cannot be read or decoded becomes a row with `error` set; it never fails the part.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aecore.anomaly import AnomalyScorers, Evidence, per_image_mse
from aecore.preprocessing import ImageDecodeError, ImageTooLargeError
from aecore.runner import Autoencoder
from batch import storage
from batch.sources import Part

VERBS = ("encode", "reconstruct-error", "score")
READ_THREADS = 16


def schema(latent_dim: int, metadata: dict) -> pa.Schema:
    """Every verb writes every column (null where it computes nothing), so outputs compare."""
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("class", pa.string()),
            pa.field("latent", pa.list_(pa.float32(), latent_dim)),
            pa.field("mse", pa.float64()),
            pa.field("score", pa.float64()),
            pa.field("is_anomaly", pa.bool_()),
            pa.field("error", pa.string()),
        ],
        metadata={"convae": json.dumps(metadata)},
    )


class PartRunner:
    """Callable class for `Dataset.map_batches`: each batch holds one part (as JSON)."""

    def __init__(
        self,
        folder: str,
        verb: str,
        output: str,
        scorer: str | None,
        batch_size: int,
        threads: int,
        providers: list[str] | None,
        max_pixels: int | None,
        metadata: dict,
    ) -> None:
        self.model = Autoencoder(Path(folder), providers, threads)
        self.scorers = (
            AnomalyScorers(self.model.manifest["anomaly"], self.model.folder)
            if verb == "score"
            else None
        )
        self.verb, self.output, self.scorer = verb, output, scorer
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.schema = schema(self.model.latent_dim, metadata)
        # Remote reads wait on an object store's latency per file, so many run at once (local
        # ones are cheaper without the threads); an actor given several CPUs decodes on as
        # many threads (OpenCV releases the GIL), to keep a GPU fed.
        self.readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read")
        self.decoders = (
            ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.run(Part.from_json(str(text))) for text in batch["part"]]
        return {key: np.array([d[key] for d in done]) for key in ("name", "images", "failed")}

    def run(self, part: Part) -> dict:
        paths, classes, blobs, errors = self._inputs(part)
        rows = len(paths)
        latents = np.zeros((rows, self.model.latent_dim), np.float32)
        mse, score, flag = [None] * rows, [None] * rows, [None] * rows
        # Decode a batch, run it, move on: memory stays one batch of float images, not a part.
        for start in range(0, rows, self.batch_size):
            stop = min(start + self.batch_size, rows)
            todo = [i for i in range(start, stop) if errors[i] is None]
            decoded = (self.decoders.map if self.decoders else map)(
                self._preprocess, [blobs[i] for i in todo]
            )
            good, images = [], []
            for i, image in zip(todo, decoded, strict=True):
                if isinstance(image, str):
                    errors[i] = image
                else:
                    good.append(i)
                    images.append(image)
            if not good:
                continue
            x = np.stack(images)
            z = self.model.encode(x)
            latents[good] = z
            if self.verb == "encode":
                continue
            y = self.model.decode(z)
            for row, value in zip(good, per_image_mse(x, y), strict=True):
                mse[row] = float(value)
            if self.verb == "score":
                values = self.scorers.score(self.scorer, Evidence(x, y, z))
                threshold = self.scorers.thresholds[self.scorer]
                for row, value in zip(good, values, strict=True):
                    score[row], flag[row] = float(value), bool(value > threshold)
        failed = pa.array([e is not None for e in errors])
        latent = pa.FixedSizeListArray.from_arrays(
            pa.array(latents.reshape(-1)), self.model.latent_dim, mask=failed
        )
        columns = {"path": paths, "class": classes, "latent": latent, "mse": mse,
                   "score": score, "is_anomaly": flag, "error": errors}  # fmt: skip
        table = pa.table(columns, schema=self.schema)
        # Dictionary-encoding 1,024 distinct floats per row costs more than it saves.
        storage.write_parquet_atomically(
            table, storage.join(self.output, part.name), use_dictionary=["class", "error"]
        )
        return {"name": part.name, "images": rows, "failed": sum(e is not None for e in errors)}

    def _preprocess(self, blob: bytes) -> np.ndarray | str:
        """The encoder's input, or the reason there is none."""
        try:
            return self.model.preprocess(blob, self.max_pixels)
        except ImageTooLargeError as exc:
            return f"image_too_large: {exc}"
        except ImageDecodeError as exc:
            return f"invalid_image: {exc}"

    @staticmethod
    def _read(path: str) -> bytes | str:
        try:
            return storage.read_bytes(path)
        except OSError as exc:  # missing, permission, network: this row only
            return f"unreadable: {exc}"

    def _inputs(self, part: Part) -> tuple[list[str], list, list[bytes | None], list[str | None]]:
        """(paths, classes, image bytes, errors) of a part, one entry per row."""
        if part.parquet is None:
            remote = any("://" in path for path in part.paths)
            read = list((self.readers.map if remote else map)(self._read, part.paths))
            blobs = [None if isinstance(r, str) else r for r in read]
            errors = [r if isinstance(r, str) else None for r in read]
            return list(part.paths), list(part.classes), blobs, errors
        cols = part.columns
        fs, path = storage.resolve(part.parquet)
        wanted = [c for c in (cols["image"], cols["path"], cols["label"]) if c]
        table = pq.ParquetFile(path, filesystem=fs).read_row_group(part.row_group, columns=wanted)
        blobs = table.column(cols["image"]).to_pylist()
        errors = [None if b else "no_image: the image column is null or empty" for b in blobs]
        if cols["path"]:
            paths = [str(p) for p in table.column(cols["path"]).to_pylist()]
        else:
            paths = [f"{part.parquet}#{part.row_group}:{i}" for i in range(len(blobs))]
        if cols["label"]:
            classes = [
                None if c is None else str(c) for c in table.column(cols["label"]).to_pylist()
            ]
        else:
            classes = [None] * len(blobs)
        return paths, classes, blobs, errors
