"""The one settings object; every field is read from an `AE_`-prefixed environment variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.repository.policy import check_policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AE_", env_file=".env", extra="ignore")

    # The model repository: models/<name>/<version>/. Every model under model_dir (or those in
    # AE_MODELS), each at the versions its policy asks for: latest:N, all, or specific:1,2
    # (AE_VERSION_POLICY for all, AE_VERSION_POLICIES="name=policy;..." per model). The
    # default model answers requests that name none; AE_MODEL_VERSION pins its version.
    model_dir: Path = Path("models")
    model_name: str = "intel-scenes"
    model_version: int | None = Field(default=None, gt=0)
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    version_policy: str = "latest:1"
    version_policies: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    model_poll_s: float = Field(default=0.0, ge=0)  # 0: no polling of the folder
    # What may change the served models while the server runs, as Triton's model control modes:
    # `none` (the repository API only reads; the folder is followed if AE_MODEL_POLL_S is set),
    # `poll` (the folder is followed every AE_MODEL_POLL_S, 15 s when unset), `explicit`
    # (`POST /v2/repository/models/{name}/load|unload` too, which needs AE_API_KEY).
    model_control: Literal["none", "poll", "explicit"] = "none"
    # The model /denoise answers with when a request names none (it must declare the
    # `denoise` task); "": requests must name one (`?model=`).
    denoise_model: str = "intel-scenes-denoise"

    # Execution providers in priority order, comma-separated (e.g. "CUDAExecutionProvider,
    # CPUExecutionProvider"). Empty: CUDA when this onnxruntime build has it, then CPU.
    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    require_gpu: bool = False  # refuse to start when no GPU provider is actually in use
    # fp16 graphs (exported beside the fp32 ones; inputs and outputs stay float32).
    precision: Literal["fp32", "fp16"] = "fp32"
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    trt_cache_dir: Path | None = None  # TensorRT engines; default models/<name>/.trt-cache/<v>
    intra_op_threads: int | None = Field(default=None, gt=0)  # default: the cores we may use

    # Dynamic batching, one queue per graph.
    max_batch_size: int = Field(default=32, gt=0)
    # 0: a batch is whatever queued while the previous one ran; no request waits for company.
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    max_queue_size: int = Field(default=512, gt=0)  # images waiting per graph before 429
    queue_timeout_s: float = Field(default=30.0, gt=0)  # a request waiting longer gets 429
    retry_after_s: int = Field(default=1, ge=0)

    # Request limits, checked before any image is decoded.
    max_images_per_request: int = Field(default=64, gt=0)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    # Admission, sized so that the worst case fits the 4 GiB the Kubernetes manifest gives a
    # pod (docs/api.md, "Limits and memory"): request bodies in flight, streaming ones
    # included, and decoded images in flight (about 0.6 MiB each at 128x128).
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_inflight_images: int = Field(default=512, gt=0)
    max_interpolation_steps: int = Field(default=62, ge=0)
    decode_threads: int | None = Field(default=None, gt=0)  # image decode/encode thread pool

    api_key: SecretStr | None = None  # when set, inference and /model need X-API-Key
    protect_metrics: bool = False  # also require the key on /metrics

    # Worker processes sharing the port, each with its own sessions and batchers; onnxruntime's
    # threads are then divided among them unless AE_INTRA_OP_THREADS is set.
    workers: int = Field(default=1, gt=0)

    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    # One line per request from uvicorn; behind an ingress or proxy that logs requests already,
    # turning it off saves its formatting and write on the event loop (docs/benchmarks.md).
    access_log: bool = True

    @model_validator(mode="after")
    def _control_needs_key(self) -> Settings:
        if self.model_control == "explicit" and self.api_key is None:
            raise ValueError(
                "AE_MODEL_CONTROL=explicit lets clients load and unload models: set AE_API_KEY "
                "too (the repository API then requires it), or use AE_MODEL_CONTROL=none or poll"
            )
        return self

    @property
    def poll_s(self) -> float:
        """How often the model folder is read again; 0: never."""
        if self.model_control == "poll":
            return self.model_poll_s or 15.0
        return self.model_poll_s

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        return check_policy(value)

    @field_validator("version_policies", mode="before")
    @classmethod
    def _policies(cls, value: object) -> object:
        if isinstance(value, str):  # "a=latest:2;b=all"
            pairs = [item.split("=", 1) for item in value.split(";") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("AE_VERSION_POLICIES is name=policy;name=policy")
            value = {name.strip(): policy.strip() for name, policy in pairs}
        if isinstance(value, dict):
            for policy in value.values():
                check_policy(policy)
        return value

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value


@lru_cache
def get_settings() -> Settings:
    return Settings()
