"""The Open Inference Protocol (KServe V2) over REST, beside the service's own API.

Every model of the repository is a V2 model of the same name, and its graphs are exposed as
Triton users expect to find them:
- an autoencoder `<name>` takes `image` FP32 [-1, H, W, 3] (preprocessed, in [0, 1]) and
  returns `latent` FP32 [-1, latent_dim] and `reconstruction` (asking for `latent` alone runs
  the encoder alone); `<name>-encoder` takes `image` and returns `latent`, `<name>-decoder`
  takes `latent` and returns `image`;
- a denoiser `<name>` takes `image` and returns `cleaned`.
Requests go through the data plane as every route does: the version is leased before the body
is read, then the same admission, limits and dynamic batchers. Tensors come as JSON `data` or
with the binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`),
and outputs are returned in binary when asked (`binary_data`). An `image` input also accepts
encoded image files as a BYTES tensor [-1] in binary form (each element a 4-byte little-endian
length, then the file), decoded with the service's own preprocessing; JSON has no way to carry
binary bytes, so BYTES in JSON `data` is refused. Errors are the protocol's `{"error": "..."}`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service import errors
from service.dataplane.inputs import Parsed, parse_off_loop, validate_latents, validate_tensors
from service.dataplane.plane import DataPlane, Inference
from service.engine.version import ModelVersion
from service.repository.repository import ModelNotFound, Repository
from service.responses import FastJSON
from service.routes.dependencies import PlaneDep, require_api_key
from service.settings import Settings

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
keyed = [Depends(require_api_key)]
HEADER = "inference-header-content-length"
BAD = {400: {"description": 'a malformed request: `{"error": "..."}`'}}


class ProtocolError(errors.ApiError):
    status, code = 400, "invalid_inference_request"


# Graphs of one version by part: what they take and make.
_TAKES = {"encoder": "image", "decoder": "latent", "denoiser": "image"}
_MAKES = {"encoder": "latent", "decoder": "image", "denoiser": "cleaned"}
# V2 models of a repository model, by suffix: the graphs each runs, and its outputs' names.
_KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "": (("encoder", "latent"), ("decoder", "reconstruction")),
    "-encoder": (("encoder", "latent"),),
    "-decoder": (("decoder", "image"),),
}
_DENOISER = (("denoiser", "cleaned"),)


@dataclass(frozen=True)
class V2Model:
    """One V2 model: a version of a repository model, the graphs it runs in order with the
    output each makes, and its tensors."""

    name: str
    served: ModelVersion
    versions: list[str]
    steps: tuple[tuple[str, str], ...]  # (part, output name)

    @property
    def input(self) -> str:
        return _TAKES[self.steps[0][0]]

    def shape(self, tensor: str) -> list[int]:
        model = self.served.model
        if tensor == "latent":
            return [-1, model.latent_dim]  # type: ignore[union-attr]
        return [-1, *model.spec.shape]

    @property
    def outputs(self) -> list[str]:
        return [output for _, output in self.steps]

    def output_shape(self, output: str) -> list[int]:
        part = next(p for p, o in self.steps if o == output)
        return self.shape(_MAKES[part])

    def config(self, settings: Settings) -> dict[str, Any]:
        """Triton's model configuration (its extension): what Triton's tools, perf_analyzer
        among them, read to size their requests; dims leave out the batch dimension."""

        def tensor(name: str, shape: list[int]) -> dict[str, Any]:
            return {"name": name, "data_type": "TYPE_FP32", "dims": shape[1:]}

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": settings.max_batch_size,
            "input": [tensor(self.input, self.shape(self.input))],
            "output": [tensor(o, self.output_shape(o)) for o in self.outputs],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)
            },
        }

    def metadata(self) -> dict[str, Any]:
        def tensor(name: str, shape: list[int]) -> dict[str, Any]:
            return {"name": name, "datatype": "FP32", "shape": shape}

        return {
            "name": self.name,
            "versions": self.versions,
            "platform": "onnxruntime_onnx",
            "inputs": [tensor(self.input, self.shape(self.input))],
            "outputs": [tensor(o, self.output_shape(o)) for o in self.outputs],
        }


def _kinds(served: ModelVersion) -> dict[str, tuple[tuple[str, str], ...]]:
    """The V2 models (by suffix) that a version's graphs make."""
    return {"": _DENOISER} if "denoiser" in served.batchers else _KINDS


def v2_names(repository: Repository) -> list[str]:
    """Every V2 model name this server answers to."""
    return sorted(name + suffix for name in repository.served
                  for suffix in _kinds_of(repository, name))  # fmt: skip


def _target(repository: Repository, name: str) -> tuple[str, str]:
    """(repository model, suffix) of a V2 model name; a repository model's own name first."""
    if name in repository.served:
        return name, ""
    for suffix in ("-encoder", "-decoder"):
        base = name.removesuffix(suffix)
        if base != name and suffix in _kinds_of(repository, base):
            return base, suffix
    repository.check_loading(name)
    raise ModelNotFound(f"no model {name!r}; this server has {v2_names(repository)}")


def _kinds_of(repository: Repository, name: str) -> dict[str, Any]:
    versions = repository.served.get(name)
    return _kinds(versions[max(versions)]) if versions else {}


def _version(version: str | None) -> int | None:
    if version is None:
        return None
    if not (version.isascii() and version.isdigit()) or int(version) == 0:
        raise ModelNotFound(f"no version {version!r}; versions are positive whole numbers")
    return int(version)


def _model(name: str, served: ModelVersion, suffix: str, repository: Repository) -> V2Model:
    steps = _kinds(served).get(suffix)
    if steps is None:
        raise ModelNotFound(f"no model {name!r} at version {served.version}")
    versions = repository.served.get(served.name, {})
    return V2Model(name, served, [str(v) for v in sorted(versions)], steps)


def lookup(plane: DataPlane, name: str, version: str | None) -> V2Model:
    """A V2 model at a served version (the highest when `version` is None), for metadata."""
    base, suffix = _target(plane.repository, name)
    served = plane.repository.resolve(base, _version(version))
    return _model(name, served, suffix, plane.repository)


# -- server and model metadata, health -----------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "convae-serve", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness (V2), as GET /healthz", responses={503: {}})
async def live(request: Request) -> Response:
    plane: DataPlane | None = request.app.state.plane
    ok = plane is None or not plane.dead()
    return JSONResponse({"live": ok}, status_code=200 if ok else 503)


@router.get("/health/ready", summary="Readiness (V2), as GET /readyz", responses={503: {}})
async def ready(request: Request) -> Response:
    plane: DataPlane | None = request.app.state.plane
    ok = plane is not None and plane.unready() is None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", summary="Model metadata", dependencies=keyed, responses={404: {}})
async def model_metadata(name: str, plane: PlaneDep) -> dict:
    return lookup(plane, name, None).metadata()


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    dependencies=keyed,
    responses={404: {}},
)
async def version_metadata(name: str, version: str, plane: PlaneDep) -> dict:
    return lookup(plane, name, version).metadata()


@router.get("/models/{name}/config", summary="Model configuration (Triton's extension)",
            dependencies=keyed, responses={404: {}})  # fmt: skip
async def model_config(name: str, plane: PlaneDep) -> dict:
    return lookup(plane, name, None).config(plane.settings)


@router.get("/models/{name}/versions/{version}/config", summary="Model version configuration",
            dependencies=keyed, responses={404: {}})  # fmt: skip
async def version_config(name: str, version: str, plane: PlaneDep) -> dict:
    return lookup(plane, name, version).config(plane.settings)


def _ready(model: V2Model) -> Response:
    ok = model.served.healthy
    return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}/ready", summary="Model readiness", dependencies=keyed,
            responses={404: {}, 503: {}})  # fmt: skip
async def model_ready(name: str, plane: PlaneDep) -> Response:
    return _ready(lookup(plane, name, None))


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness",
            dependencies=keyed, responses={404: {}, 503: {}})  # fmt: skip
async def version_ready(name: str, version: str, plane: PlaneDep) -> Response:
    return _ready(lookup(plane, name, version))


# -- inference ---------------------------------------------------------------------------------

INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {
                                        "type": "array",
                                        "items": {"type": "integer", "minimum": 0},
                                    },
                                    "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
                                    "data": {"type": "array"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "JSON header (Inference-Header-Content-Length bytes), then "
                    "the binary tensors in input order",
                }
            },
        },
    }
}


@router.post("/models/{name}/infer", summary="Inference (V2)", dependencies=keyed,
             openapi_extra=INFER_DOC, responses={**BAD, 404: {}, 413: {}, 429: {}, 503: {}})  # fmt: skip
async def infer(name: str, request: Request, plane: PlaneDep) -> Response:
    return await _infer(plane, name, None, request)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference of a version (V2)",
             dependencies=keyed, openapi_extra=INFER_DOC,
             responses={**BAD, 404: {}, 413: {}, 429: {}, 503: {}})  # fmt: skip
async def infer_version(name: str, version: str, request: Request, plane: PlaneDep):
    return await _infer(plane, name, version, request)


async def _infer(plane: DataPlane, name: str, version: str | None, request: Request) -> Response:
    base, suffix = _target(plane.repository, name)
    # Leased before the body is read: a version retired during a slow upload still answers.
    with plane.serving(base, _version(version), None) as inference:
        model = _model(name, inference.served, suffix, plane.repository)
        declared = request.headers.get(HEADER)
        rows, count, wanted, request_id = await parse_off_loop(  # JSON numbers above all
            await request.body(), lambda body: _request(model, body, declared, plane.settings)
        )
        with inference.admit(count):
            results = await _run(inference, model, rows, wanted)
        inference.count(f"v2:{name}", count)
    return _response(model, request_id, results, wanted)


async def _run(inference: Inference, model: V2Model, rows: Any, wanted: dict[str, bool]
               ) -> dict[str, np.ndarray]:  # fmt: skip
    """The model's graphs in order, up to the last output asked for."""
    last = max(model.outputs.index(output) for output in wanted)
    results = {}
    for part, output in model.steps[: last + 1]:
        if isinstance(rows, Parsed):  # image files, decoded straight into the first graph's batch
            _, rows = await inference.through(part, rows, f"v2:{model.name}")
        else:
            rows = await inference.run(part, rows)
        results[output] = rows
    return results


def _request(model: V2Model, body: bytes, declared: str | None, settings: Settings
             ) -> tuple[Any, int, dict[str, bool], Any]:  # fmt: skip
    """(input rows or image files, their count, the outputs asked for, the request id)."""
    head, binary = _split(body, declared)
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the inference header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError('the request must be an object with an "inputs" list')
    if len(header["inputs"]) != 1:
        raise ProtocolError(f"model {model.name!r} takes one input, {model.input!r}")
    rows, count = _input(model, header["inputs"][0], binary, settings)
    return rows, count, _outputs(model, header), header.get("id")


def _split(body: bytes, declared: str | None) -> tuple[bytes, bytes]:
    if declared is None:
        return body, b""
    if not (declared.strip().isascii() and declared.strip().isdigit()):
        raise ProtocolError(f"{HEADER} must be a whole number of bytes, got {declared!r}")
    length = int(declared)
    if length == 0 or length > len(body):
        raise ProtocolError(f"{HEADER} is {length}, the body has {len(body)} bytes")
    return body[:length], body[length:]


def _input(model: V2Model, spec: Any, binary: bytes, settings: Settings) -> tuple[Any, int]:
    if not isinstance(spec, dict):
        raise ProtocolError("each input must be an object")
    if spec.get("name") != model.input:
        raise ProtocolError(f"model {model.name!r} has input {model.input!r}, got "
                            f"{spec.get('name')!r}")  # fmt: skip
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError("`shape` must be a list of non-negative integers")
    size = _parameters(spec).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise ProtocolError(
            f"binary_data_size is {size!r}, the binary part of the body has {len(binary)} bytes"
        )
    if size is None and binary:
        raise ProtocolError("the body has binary data but no input declares binary_data_size")
    limit = settings.max_images_per_request
    if shape and shape[0] > limit:
        raise errors.TooManyImages(f"{shape[0]} rows in one request; the limit is {limit}")
    if datatype == "BYTES" and model.input == "image":
        return _files(shape, binary if size is not None else None), shape[0] if shape else 0
    if datatype != "FP32":
        raise ProtocolError(f"input {model.input!r} is FP32" + (
            " (or BYTES of encoded image files)" if model.input == "image" else "")
            + f", got {datatype!r}")  # fmt: skip
    declared = model.shape(model.input)
    expected = [d if d > 0 else None for d in declared]
    if len(shape) != len(expected) or any(e is not None and e != d for e, d in
                                          zip(expected, shape, strict=True)):  # fmt: skip
        raise ProtocolError(f"input {model.input!r} has shape {declared}, got {shape}")
    count = math.prod(shape)
    if size is not None:
        if size != 4 * count:
            raise ProtocolError(f"shape {shape} needs {4 * count} bytes of FP32, got {size}")
        array = np.frombuffer(binary, "<f4").reshape(shape)
    else:
        array = _json_data(spec.get("data"), count).reshape(shape)
    served = model.served.model
    if model.input == "image":
        return validate_tensors(array.astype(np.float32), served.spec), shape[0]
    return validate_latents(array, served.latent_dim), shape[0]  # type: ignore[union-attr]


def _parameters(item: dict) -> dict:
    """An object's `parameters`: an object, or absent."""
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError("`parameters` must be an object")
    return parameters


def _json_data(data: Any, count: int) -> np.ndarray:
    """FP32 `data` as JSON carries it: a flat or nested list of JSON numbers, nothing else
    (no strings such as "1.5", no true/false)."""
    try:
        values = np.asarray(data, dtype=object).ravel()
    except ValueError:  # ragged nesting
        raise ProtocolError("`data` must be a flat or evenly nested list of numbers") from None
    if not isinstance(data, list) or not {type(v) for v in values} <= {int, float}:
        raise ProtocolError("FP32 `data` must be a list of JSON numbers (not strings, booleans "
                            "or null)")  # fmt: skip
    if values.size != count:
        raise ProtocolError(f"`data` holds {values.size} values, the shape needs {count}")
    with np.errstate(over="ignore"):
        return values.astype(np.float64).astype(np.float32)


def _files(shape: list[int], binary: bytes | None) -> Parsed:
    """A BYTES tensor of encoded image files: each a 4-byte little-endian length, then bytes."""
    if binary is None:
        raise ProtocolError("BYTES (encoded image files) must come as binary data")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] == 0:
        raise ProtocolError(f"a BYTES input of image files has shape [N] or [N, 1], got {shape}")
    files, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise ProtocolError("the BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise ProtocolError("the BYTES data ends inside an element")
        files.append(binary[offset : offset + length])
        offset += length
    if len(files) != shape[0]:
        raise ProtocolError(f"the BYTES data holds {len(files)} elements, the shape {shape}")
    return Parsed(files, None, {})


def _outputs(model: V2Model, header: dict) -> dict[str, bool]:
    """The outputs asked for (all when none are named), each with whether it is wanted in
    binary (default: JSON)."""
    binary = bool(_parameters(header).get("binary_data_output", False))
    outputs = header.get("outputs")
    if outputs is None:
        return dict.fromkeys(model.outputs, binary)
    if (
        not isinstance(outputs, list)
        or not outputs
        or not all(isinstance(o, dict) for o in outputs)
    ):
        raise ProtocolError(f"`outputs` must be a list of objects naming some of {model.outputs}")
    wanted = {}
    for output in outputs:
        name = output.get("name")
        if name not in model.outputs or name in wanted:
            raise ProtocolError(f"model {model.name!r} has outputs {model.outputs}, each asked "
                                f"for once; got {name!r}")  # fmt: skip
        wanted[name] = bool(_parameters(output).get("binary_data", binary))
    return wanted


def _response(model: V2Model, request_id: Any, results: dict[str, np.ndarray],
              wanted: dict[str, bool]) -> Response:  # fmt: skip
    body: dict[str, Any] = {"model_name": model.name,
                            "model_version": str(model.served.version)}  # fmt: skip
    if isinstance(request_id, str):
        body["id"] = request_id
    outputs, blobs = [], []
    for name, binary in wanted.items():
        result = np.ascontiguousarray(results[name], np.float32)
        output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(result.shape)}
        if binary:
            blobs.append(result.astype("<f4").tobytes())
            output["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            output["data"] = result.ravel()
        outputs.append(output)
    body["outputs"] = outputs
    if not blobs:
        return FastJSON(body)
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
