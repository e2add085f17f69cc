"""The OpenAPI document, constrained by the same settings and model the server enforces.

Routes document their bodies generically (service/schemas.py); this module adds what depends
on the deployment: image-count limits (`AE_MAX_IMAGES_PER_REQUEST`), the latent length and the
scorer names of the loaded model, the interpolation rules, and the API-key security scheme only
where a key is actually required. Client generators, gateways and schemathesis read the
result, so a schema-valid request is one the server accepts (image bytes aside: whether bytes
decode as an image is content, not shape).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.errors import ApiError
from service.repository.repository import Repository
from service.routes.dependencies import TASKS
from service.routes.v2 import v2_names
from service.settings import Settings

FLOAT32_MAX = 3.4028234663852886e38  # latents are float32: larger numbers are refused
SCHEME = "APIKeyHeader"


def install(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with the constrained document (cached once the model is loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        plane = app.state.plane
        repository = plane.repository if plane is not None else None
        model = _default(repository)
        constrain(spec, settings, model, repository)
        if model is not None:  # final until the repository changes (Repository.on_change)
            app.openapi_schema = spec
        return spec

    app.openapi = openapi


def _default(repository: Repository | None) -> Any | None:
    """The default model's runner, once it serves."""
    try:
        return repository.resolve(None, None).model if repository is not None else None
    except ApiError:
        return None


def _serving(repository: Repository | None, task: str | None) -> list[str]:
    """The served models that declare `task` (any task: every served model)."""
    names = []
    for name, versions in (repository.served if repository is not None else {}).items():
        if task is None or task in versions[max(versions)].tasks:
            names.append(name)
    return sorted(names)


def _enum(parameter: dict[str, Any], names: list[str]) -> None:
    if names:  # an empty enum would admit nothing: leave the plain string
        parameter["schema"] = {"type": "string", "enum": names}


def constrain(
    spec: dict[str, Any], settings: Settings, model: Any | None, repository: Repository | None
) -> None:
    """`model` is the default model (its latent length and scorers describe the bodies);
    `repository` what serves (the `model` and V2 name enums)."""
    served = repository.served if repository is not None else {}
    limits = _Limits(settings, model)
    for path, item in spec["paths"].items():
        for operation in item.values():
            _security(path, operation, settings)
            content = operation.get("requestBody", {}).get("content", {})
            for media, body in content.items():
                schema = body.get("schema", {})
                if path == "/interpolate" and media == "application/json":
                    body["schema"] = limits.interpolate_json()
                elif path == "/generate":
                    limits.generate(schema.get("properties", {}))
                else:
                    limits.apply(schema.get("properties", {}))
            for parameter in operation.get("parameters", []):
                if model is None:
                    continue
                if parameter["name"] == "scorer":
                    parameter["schema"] = {"type": "string", "enum": model.scorers.names}
                elif path.startswith("/v2/models/") and parameter["name"] == "name":
                    _enum(parameter, v2_names(repository) if repository is not None else [])
                elif path.startswith("/v2/models/") and parameter["name"] == "version":
                    versions = sorted({v for vs in served.values() for v in vs})
                    parameter["schema"] = {"type": "string", "enum": [str(v) for v in versions]}
                elif parameter["in"] == "query" and parameter["name"] == "model":
                    _enum(parameter, _serving(repository, TASKS.get(path)))
    if settings.api_key is None:
        spec.get("components", {}).pop("securitySchemes", None)


def _security(path: str, operation: dict[str, Any], settings: Settings) -> None:
    """Security only where a key is required: with AE_API_KEY, and on /metrics only with
    AE_PROTECT_METRICS; a 401 is documented only there."""
    keyed = settings.api_key is not None and (path != "/metrics" or settings.protect_metrics)
    if not keyed:
        operation.pop("security", None)
        operation.get("responses", {}).pop("401", None)
    elif "security" in operation:
        operation["responses"].setdefault("401", {"description": "missing or wrong X-API-Key"})


class _Limits:
    def __init__(self, settings: Settings, model: Any | None) -> None:
        self.max_images = settings.max_images_per_request
        self.max_steps = settings.max_interpolation_steps
        self.latent_dim = model.latent_dim if model is not None else None
        generator = getattr(model, "generator", None)
        self.classes = generator.classes if generator is not None else None

    def images(self, item: dict[str, Any], least: int = 1, most: int | None = None):
        return {"type": "array", "items": item, "minItems": least,
                "maxItems": most or self.max_images}  # fmt: skip

    def latents(self, least: int = 1, most: int | None = None) -> dict[str, Any]:
        value = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
        latent: dict[str, Any] = {"type": "array", "items": value, "minItems": 1}
        if self.latent_dim is not None:
            latent.update(minItems=self.latent_dim, maxItems=self.latent_dim)
        return {"type": "array", "items": latent, "minItems": least,
                "maxItems": most or self.max_images}  # fmt: skip

    def apply(self, properties: dict[str, Any]) -> None:
        if properties.get("images", {}).get("type") == "array":
            images = properties["images"]
            described = {k: images[k] for k in ("description", "title") if k in images}
            item = images["items"]
            if item.get("type") == "string" and "format" not in item:
                item = {**item, "format": "byte"}  # OpenAPI's name for base64 text
            properties["images"] = {**self.images(item), **described}
        if "latents" in properties:
            properties["latents"] = {**self.latents(), "description": "N latents"}
        if "steps" in properties:
            properties["steps"] = self.steps()

    def generate(self, properties: dict[str, Any]) -> None:
        """At most AE_MAX_IMAGES_PER_REQUEST images, of one of the model's classes."""
        properties["n"] = {**properties["n"], "maximum": self.max_images}
        if self.classes is not None:
            one_of = {"type": "string", "enum": self.classes}
            properties["class"] = {**properties["class"], "anyOf": [one_of, {"type": "null"}]}

    def steps(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": 0, "maximum": self.max_steps,
                "description": "K: K+2 images from a to b, ends included; needs two inputs"}  # fmt: skip

    def interpolate_json(self) -> dict[str, Any]:
        """Exactly one input kind and exactly one of `steps` (two inputs) or `weights`."""
        base64 = {"type": "string", "format": "byte", "description": "base64 of an image file"}
        weights = {
            "type": "array",
            "items": {"type": "number", "minimum": 0},
            "minItems": 1,
            "maxItems": self.max_images,
            "description": "one per input, non-negative, summing to 1",
        }
        variants = []
        for inputs, two, many in (
            ("images", self.images(base64, 2, 2), self.images(base64)),
            ("latents", self.latents(2, 2), self.latents()),
        ):
            other = "latents" if inputs == "images" else "images"
            for mode, schema, values in (("steps", self.steps(), two), ("weights", weights, many)):
                excluded = [other, "weights" if mode == "steps" else "steps"]
                variants.append(
                    {
                        "type": "object",
                        "properties": {inputs: values, mode: schema},
                        "required": [inputs, mode],
                        "not": {"anyOf": [{"required": [name]} for name in excluded]},
                    }
                )
        return {"oneOf": variants}
