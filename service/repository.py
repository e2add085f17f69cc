"""The model repository: every model under AE_MODEL_DIR, the versions its policy asks for, each
with its own sessions and batchers; new versions picked up and old ones retired without a
restart (as Triton's model repository and TF Serving's version policies do).

A version is loaded, checked (sha256 of every file, graph shapes against the manifest) and
warmed up before it takes traffic; a request holds a lease on the version it started on, so a
retired version finishes what it has before its batchers stop. A version that fails to load is
reported with its reason (`index()`, the log) and whatever served before keeps serving. Only
folders named by a positive integer are versions: the export stages a version in a hidden
`.N.partial` folder and publishes it by one rename, so a half-written folder is never loaded
(people who copy folders by hand should do the same: copy to `.N.partial`, then rename).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from aecore import manifest
from service.errors import ApiError
from service.inputs import Parsed
from service.model import AutoencoderModel
from service.policy import wanted_versions

log = logging.getLogger(__name__)


class ModelNotFound(ApiError):
    status, code = 404, "model_not_found"


class Served:
    """One loaded model version: its sessions and batchers, and what handlers call on it."""

    def __init__(self, runtime: Any, model: AutoencoderModel) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.model = model
        self.leases = 0
        self.retiring = False
        self.encoder = runtime.batcher("encoder", model.encode, model)
        self.decoder = runtime.batcher("decoder", model.decode, model)

    @property
    def healthy(self) -> bool:
        return self.encoder.healthy and self.decoder.healthy

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    async def stop(self) -> None:
        await self.encoder.stop()
        await self.decoder.stop()

    @contextmanager
    def lease(self) -> Iterator[Served]:
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1

    # -- the steps handlers compose (shared limits and metrics live on the runtime) --
    async def encoded(self, parsed: Parsed, endpoint: str) -> tuple[np.ndarray, np.ndarray]:
        """A request's images as the encoder takes them, and their latents (decoding and
        batching in `Runtime.through`); `endpoint` labels the preprocess phase."""
        return await self.runtime.through(self.encoder, self.model, parsed, endpoint)

    async def encode(self, images: np.ndarray) -> np.ndarray:
        return await self.encoder.submit(images)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self.decoder.submit(latents)

    async def pngs(self, images: np.ndarray) -> list[str]:
        """Base64 PNGs of [0, 1] images, encoded in the thread pool."""
        loop = asyncio.get_running_loop()

        def one(image: np.ndarray) -> str:
            return base64.b64encode(self.model.postprocess(image)).decode("ascii")

        return list(
            await asyncio.gather(*(loop.run_in_executor(self.pool, one, im) for im in images))
        )

    def admit(self, images: int):
        return self.runtime.admit(images)

    def phase(self, name: str, endpoint: str):
        return self.runtime.phase(name, endpoint)

    def count(self, endpoint: str, n: int) -> None:
        self.runtime.metrics.images.labels(endpoint).inc(n)

    def ref(self) -> dict:
        return {"name": self.model.name, "version": self.model.version}


class Repository:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.served: dict[str, dict[int, Served]] = {}
        self.failed: dict[tuple[str, int], Exception] = {}
        self.unloaded: set[str] = set()  # unloaded by the API: the poller leaves them alone
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()

    # -- what to serve ----------------------------------------------------------------------
    def names(self) -> list[str]:
        root = Path(self.settings.model_dir)
        if self.settings.models:
            return list(self.settings.models)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and manifest.versions(p))

    def policy(self, name: str) -> str:
        s = self.settings
        if name == s.model_name and s.model_version is not None:
            return f"specific:{s.model_version}"
        return s.version_policies.get(name, s.version_policy)

    def _serves_autoencoder(self, folder: Path) -> bool:
        try:
            body = manifest.read(folder, verify=False)
        except manifest.ModelFolderError:
            return True  # let the load report what is wrong
        return "encode" in manifest.tasks(body)

    # -- loading and retiring -------------------------------------------------------------------
    async def sync(self, names: list[str] | None = None) -> dict[str, list[int]]:
        """Bring the served versions in line with the folder and the policies; what changed."""
        async with self._lock:
            changed: dict[str, list[int]] = {}
            for name in names or sorted(set(self.names()) | set(self.served)):
                if name in self.unloaded and names is None:
                    continue
                root = Path(self.settings.model_dir) / name
                available = [
                    v for v in manifest.versions(root) if self._serves_autoencoder(root / str(v))
                ]
                wanted = set(wanted_versions(self.policy(name), available))
                have = self.served.setdefault(name, {})
                for version in sorted(wanted - set(have)):
                    if await self._load(name, version, root / str(version)):
                        changed.setdefault(name, []).append(version)
                # Retire only what a loaded version replaces: a failed load keeps the old one.
                if not wanted or set(have) & wanted:
                    for version in sorted(set(have) - wanted):
                        self._retire(have.pop(version))
                        changed.setdefault(name, []).append(-version)
                if not have:
                    self.served.pop(name)
            if changed:
                self.runtime.changed()
            return changed

    async def _load(self, name: str, version: int, folder: Path) -> bool:
        key = (name, version)
        try:
            served = await self.runtime.open(folder)
        except Exception as exc:  # any reason a version cannot serve: keep the others serving
            if str(self.failed.get(key)) != str(exc):  # once per new reason, not every poll
                log.error("model %s v%d failed to load, not served: %s: %s", name, version,
                          type(exc).__name__, exc)  # fmt: skip
            self.failed[key] = exc
            return False
        self.failed.pop(key, None)
        served.start()
        self.served.setdefault(name, {})[version] = served
        log.info("model %s v%d takes traffic", name, version)
        return True

    def _retire(self, served: Served) -> None:
        served.retiring = True
        task = asyncio.get_running_loop().create_task(self._drain(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, served: Served) -> None:
        while served.leases:  # requests that started on this version finish on it
            await asyncio.sleep(0.05)
        await served.stop()
        log.info("model %s v%d retired", served.model.name, served.model.version)

    async def load(self, name: str) -> dict[str, list[int]]:
        """The repository API's load: (re)read the model's folder and serve its policy."""
        root = Path(self.settings.model_dir) / name
        if not manifest.versions(root):
            raise ModelNotFound(f"no model {name!r} under the repository")
        self.unloaded.discard(name)
        return await self.sync([name])

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self.served:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            for served in self.served.pop(name).values():
                self._retire(served)
            self.runtime.changed()

    async def poll(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.sync()
            except Exception:  # a poll must never stop polling
                log.exception("repository poll failed")

    async def close(self) -> None:
        async with self._lock:
            for versions in self.served.values():
                for served in versions.values():
                    await served.stop()
            self.served.clear()
        for task in list(self._retiring):
            await task

    # -- finding a version -----------------------------------------------------------------
    def resolve(self, name: str | None, version: int | None) -> Served:
        name = self.settings.model_name if name is None else name
        versions = self.served.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served; GET /models lists what is")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version} loaded; it has {sorted(versions)}"
            )
        return versions[version]

    def index(self) -> list[dict[str, Any]]:
        """Every version on disk of every model in the repository, with its state."""
        rows = []
        for name in sorted(set(self.names()) | set(self.served)):
            on_disk = manifest.versions(Path(self.settings.model_dir) / name)
            for version in sorted(set(on_disk) | set(self.served.get(name, {}))):
                served = self.served.get(name, {}).get(version)
                if served is not None:
                    state, reason = ("READY" if served.healthy else "UNAVAILABLE"), ""
                elif (name, version) in self.failed:
                    error = self.failed[(name, version)]
                    state, reason = "UNAVAILABLE", f"{type(error).__name__}: {error}"
                else:
                    state = "UNLOADED" if name in self.unloaded else "AVAILABLE"
                    reason = "unloaded" if name in self.unloaded else "not in the version policy"
                rows.append({"name": name, "version": str(version), "state": state,
                             "reason": reason})  # fmt: skip
        return rows
