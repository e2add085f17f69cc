"""The model repository: every model under AE_MODEL_DIR, whatever its task (autoencoders,
denoisers), at the versions its policy asks for; new versions picked up and old ones retired
without a restart, as Triton's model repository and TF Serving's version policies do.

This module only manages the lifecycle; the engine (`service.engine`) opens and runs a
version. A version is loaded, checked (sha256 of every file, graph shapes against the manifest)
and warmed up before it takes traffic; a request holds a lease on the version it started on, so
a retired version finishes what it has before its batchers stop. A version that fails to load
is reported with its reason (`index()`, the log) and whatever served before keeps serving. Only
folders named by a positive integer are versions: the export stages a version in a hidden
`.N.partial` folder and publishes it by one rename, so a half-written folder is never loaded.

What may change the served models is AE_MODEL_CONTROL (`service.settings`): the repository
API's load and unload are refused unless it is `explicit`, the default model can never be
unloaded, and with several worker processes every worker follows the shared control state
(`service.repository.control`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aecore import manifest
from aecore.denoiser import TASK as DENOISE
from service.engine.version import ModelVersion, open_version
from service.errors import ApiError, NotFound, Unavailable
from service.metrics import Metrics
from service.repository.control import ControlState, SharedState
from service.repository.policy import wanted_versions
from service.settings import Settings

log = logging.getLogger(__name__)

# How long a retired version waits for its leased requests beyond AE_QUEUE_TIMEOUT_S (a body
# still arriving); then it stops, and what is left gets 503 `shutting_down`.
DRAIN_S = 30.0
# A model's name is one folder under the repository: no separators, no `.` or `..`.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelNotFound(ApiError):
    status, code = 404, "model_not_found"


class ControlDisabled(ApiError):
    status, code = 403, "model_control_disabled"


class DefaultModel(ApiError):
    status, code = 409, "default_model"


class LoadFailed(ApiError):
    status, code = 400, "load_failed"


class Repository:
    def __init__(
        self, settings: Settings, metrics: Metrics, shared: SharedState, threads: int
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        self.threads = threads  # onnxruntime intra-op threads of each session
        self.served: dict[str, dict[int, ModelVersion]] = {}  # never an empty entry
        self.failed: dict[tuple[str, int], Exception] = {}
        self.loading: set[tuple[str, int]] = set()
        self.on_change: list[Callable[[], None]] = []
        self._seen = ControlState()  # the control state this process has applied
        self._lock = asyncio.Lock()  # one change of the served versions at a time
        self._following = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()

    # -- what may be served -----------------------------------------------------------------
    def allowed(self, name: str) -> bool:
        """A valid folder name, and in the allow-list (AE_MODELS, the defaults) when one is set."""
        s = self.settings
        if not _NAME.match(name):
            return False
        return not s.models or name in {*s.models, s.model_name, s.denoise_model}

    def names(self) -> list[str]:
        """The models on disk this server may serve."""
        root = Path(self.settings.model_dir)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and self.allowed(p.name) and manifest.versions(p))  # fmt: skip

    def folder(self, name: str) -> Path:
        """`models/<name>`, for a name this server may serve that has versions on disk."""
        root = Path(self.settings.model_dir) / name
        if not self.allowed(name) or not manifest.versions(root):
            raise ModelNotFound(f"no model {name!r} in the repository; GET /models lists them")
        return root

    def policy(self, name: str) -> str:
        s = self.settings
        if name == s.model_name and s.model_version is not None:
            return f"specific:{s.model_version}"
        return s.version_policies.get(name, s.version_policy)

    # -- loading and retiring -------------------------------------------------------------------
    async def start(self) -> None:
        """The first load, of every model: the default model must serve (else the reason it
        did not stops start-up), and AE_DENOISE_MODEL, when installed, must declare `denoise`.
        A worker process started later (a replacement) starts from what the others serve."""
        self._seen = self.shared.read()
        await self.sync()
        s = self.settings
        if s.model_name not in self.served:
            reasons = [error for (name, _), error in self.failed.items() if name == s.model_name]
            if reasons:
                raise reasons[-1]
            raise ModelNotFound(f"the default model {s.model_name!r} is not in the repository "
                                f"({s.model_dir})")  # fmt: skip
        if not s.denoise_model:
            return
        if (versions := self.served.get(s.denoise_model)) is None:
            log.warning("no denoising model %r served; /denoise answers 404 unless a request "
                        "names one with ?model=", s.denoise_model)  # fmt: skip
        elif DENOISE not in (tasks := versions[max(versions)].tasks):
            raise manifest.ModelFolderError(
                f"AE_DENOISE_MODEL={s.denoise_model!r} serves {tasks}, not {DENOISE!r}"
            )

    async def sync(self, names: list[str] | None = None) -> dict[str, list[int]]:
        """Bring the served versions in line with the folder, the policies and the control
        state; what changed (a negative version: retired)."""
        async with self._lock:
            changed: dict[str, list[int]] = {}
            for name in names or sorted(set(self.names()) | set(self.served)):
                if name not in self._seen.unloaded and (delta := await self._sync_one(name)):
                    changed[name] = delta
            if changed:
                self._changed()
            return changed

    async def _sync_one(self, name: str) -> list[int]:
        available = manifest.versions(Path(self.settings.model_dir) / name)
        available = available if self.allowed(name) else []
        latest = self.policy(name).startswith("latest")
        wanted = set(wanted_versions(self.policy(name), available))
        have = dict(self.served.get(name, {}))
        for key in [k for k in self.failed if k[0] == name and k[1] not in available]:
            del self.failed[key]  # its folder is gone: nothing to report any more
        delta = []
        for version in [v for v, served in have.items() if not served.healthy]:
            # Its inference thread is gone: load it anew. Until that succeeds the dead one stays
            # published, so liveness keeps failing and the orchestrator restarts the process.
            dead = have[version]
            if await self._add(name, version, have):
                self._retire(dead)
                delta.append(version)
        for version in sorted(wanted - set(have)):
            if await self._add(name, version, have):
                delta.append(version)
        if not have and latest:
            # None of the newest loads (a corrupt publish): serve the newest that does, as the
            # processes started before it still do.
            for version in sorted(set(available) - wanted, reverse=True):
                if await self._add(name, version, have):
                    log.warning("model %s serves v%d: the versions its policy names did not "
                                "load", name, version)  # fmt: skip
                    delta.append(version)
                    break
        # Retire only what a loaded version replaces: a failed load keeps the old one (with
        # latest:N, as many of the newest old ones as wanted versions failed).
        if not wanted or set(have) & wanted:
            surplus = sorted(set(have) - wanted)
            keep = len(wanted) - len(set(have) & wanted) if latest else 0
            for version in surplus[: max(0, len(surplus) - keep)]:
                self._retire(have.pop(version))
                delta.append(-version)
        self._publish(name, have)
        return delta

    async def _add(self, name: str, version: int, have: dict[int, ModelVersion]) -> bool:
        """Load `version` into `have`; it takes traffic at once, not after the others."""
        folder = Path(self.settings.model_dir) / name / str(version)
        if (loaded := await self._load(name, version, folder)) is None:
            return False
        have[version] = loaded
        self._publish(name, have)
        return True

    def _publish(self, name: str, versions: dict[int, ModelVersion]) -> None:
        # A new dict each time: a request looking a version up never sees one half-changed.
        if versions:
            self.served[name] = dict(versions)
        else:
            self.served.pop(name, None)

    async def _load(self, name: str, version: int, folder: Path) -> ModelVersion | None:
        key = (name, version)
        self.loading.add(key)
        try:
            loaded = await open_version(folder, self.settings, self.metrics, self.threads)
        except Exception as exc:  # any reason a version cannot serve: keep the others serving
            if str(self.failed.get(key)) != str(exc):  # once per new reason, not every poll
                log.error("model %s v%d failed to load, not served: %s: %s", name, version,
                          type(exc).__name__, exc)  # fmt: skip
            self.failed[key] = exc
            return None
        finally:
            self.loading.discard(key)
        self.failed.pop(key, None)
        loaded.start()
        log.info("model %s v%d takes traffic", name, version)
        return loaded

    def _retire(self, served: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, served: ModelVersion) -> None:
        # Requests that started on this version finish on it, within a bound: a client trickling
        # its body must not keep a retired version's sessions alive.
        deadline = time.monotonic() + DRAIN_S + self.settings.queue_timeout_s
        while served.leases and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await served.stop()
        log.info("model %s v%d retired", served.name, served.version)

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    # -- the repository API (AE_MODEL_CONTROL=explicit) ---------------------------------------
    def _control(self, what: str) -> None:
        if self.settings.model_control != "explicit":
            raise ControlDisabled(
                f"{what} is off: AE_MODEL_CONTROL is {self.settings.model_control!r}; the "
                "operator enables it with AE_MODEL_CONTROL=explicit and AE_API_KEY"
            )

    async def load(self, name: str) -> None:
        """Serve `name` again (after an unload) and read its folder anew, in every worker."""
        self._control("loading models")
        self.folder(name)
        await self._apply(self.shared.update(lambda state: state.load(name)))
        if name not in self.served:
            reasons = [f"v{v}: {type(e).__name__}: {e}" for (n, v), e in self.failed.items()
                       if n == name]  # fmt: skip
            raise LoadFailed(f"model {name!r} did not load: {'; '.join(reasons) or 'no version'}")

    async def unload(self, name: str) -> None:
        """Retire every version of `name`, in every worker, until it is loaded again."""
        self._control("unloading models")
        if name == self.settings.model_name:
            raise DefaultModel(
                f"{name!r} is the default model (AE_MODEL_NAME) and stays served; publish a "
                "new version or change its version policy instead"
            )
        if name not in self.served:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await self._apply(self.shared.update(lambda state: state.unload(name)))

    async def _apply(self, state: ControlState) -> None:
        """Make this process serve what the control state says (it may have been changed by
        another worker)."""
        async with self._following:
            seen = self._seen
            for name in sorted(state.unloaded - seen.unloaded):
                async with self._lock:
                    if versions := self.served.pop(name, None):
                        for served in versions.values():
                            self._retire(served)
                        self._changed()
            # The loads count as seen only once done: one that fails is tried again next round.
            self._seen = ControlState(state.unloaded, seen.loads)
            again = {n for n, count in state.loads.items() if seen.loads.get(n) != count}
            if again := sorted((again | (seen.unloaded - state.unloaded)) - state.unloaded):
                await self.sync(again)
            self._seen = state

    async def follow(self, poll_s: float, state_s: float) -> None:
        """Read the folder every `poll_s` (0: never) and the shared control state every
        `state_s`, for as long as the server runs."""
        every = min(p for p in (poll_s, state_s) if p > 0)
        folder_due = time.monotonic() + poll_s
        while True:
            await asyncio.sleep(every)
            try:  # a failed round must never stop following
                if state_s > 0:
                    await self._apply(self.shared.read())
                if poll_s > 0 and time.monotonic() >= folder_due:
                    folder_due = time.monotonic() + poll_s
                    await self.sync()
            except Exception:
                log.exception("following the model repository failed")

    async def close(self) -> None:
        async with self._lock:
            for versions in self.served.values():
                for served in versions.values():
                    await served.stop()
            self.served.clear()
        for task in list(self._retiring):
            await task

    # -- finding a version ---------------------------------------------------------------------
    def default_name(self, task: str | None) -> str:
        """The model a request that names none runs on: AE_DENOISE_MODEL for `denoise`,
        AE_MODEL_NAME for everything else."""
        if task != DENOISE:
            return self.settings.model_name
        name = self.settings.denoise_model
        if name and name not in self.served:
            self.check_loading(name)
        if not name or name not in self.served:
            raise NotFound(  # `not_found`, as before denoisers were repository models
                f"no denoising model is served as AE_DENOISE_MODEL ({name!r}); name a served "
                "model whose manifest declares the `denoise` task with ?model= (GET /models)"
            )
        return name

    def resolve(self, name: str | None, version: int | None, task: str | None = None
                ) -> ModelVersion:  # fmt: skip
        """The served version a request runs on (the highest unless `version`), of a model
        that declares `task` when one is given."""
        name = self.default_name(task) if name is None else name
        versions = self.served.get(name)
        if not versions:
            self.check_loading(name)
            raise ModelNotFound(f"model {name!r} is not served; GET /models lists what is")
        if version is None:
            served = versions[max(versions)]
        elif version in versions:
            served = versions[version]
        else:
            raise ModelNotFound(
                f"model {name!r} has no version {version} loaded; it has {sorted(versions)}"
            )
        if task is not None and task not in served.tasks:
            raise ModelNotFound(f"model {name!r} does not serve {task!r}; it serves "
                                f"{served.tasks}")  # fmt: skip
        return served

    def check_loading(self, name: str) -> None:
        """503 `model_loading` for a model loaded for the first time now."""
        if any(n == name for n, _ in self.loading):
            raise Unavailable(f"model {name!r} is loading; retry shortly", "model_loading",
                              self.settings.retry_after_s)  # fmt: skip

    def versions(self) -> list[ModelVersion]:
        """Every version serving now."""
        return [served for versions in self.served.values() for served in versions.values()]

    def index(self) -> list[dict[str, Any]]:
        """Every version on disk of every model in the repository, with its state."""
        rows = []
        for name in sorted(set(self.names()) | set(self.served)):
            on_disk = manifest.versions(Path(self.settings.model_dir) / name)
            served = self.served.get(name, {})
            for version in sorted(set(on_disk) | set(served)):
                if version in served:
                    state, reason = ("READY" if served[version].healthy else "UNAVAILABLE"), ""
                elif (name, version) in self.loading:
                    state, reason = "LOADING", ""
                elif (name, version) in self.failed:
                    error = self.failed[(name, version)]
                    state, reason = "UNAVAILABLE", f"{type(error).__name__}: {error}"
                elif name in self._seen.unloaded:
                    state, reason = "UNLOADED", "unloaded"
                else:
                    state, reason = "AVAILABLE", "not in the version policy"
                rows.append({"name": name, "version": str(version), "state": state,
                             "reason": reason})  # fmt: skip
        return rows
