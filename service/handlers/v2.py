"""The Open Inference Protocol (KServe V2) over REST, beside the service's own API.

The graphs are exposed as Triton users expect to find them: `<name>-encoder` takes `image`
FP32 [-1, H, W, 3] (preprocessed, in [0, 1]) and returns `latent` FP32 [-1, latent_dim];
`<name>-decoder` takes `latent` and returns `image`. Requests go through the same dynamic
batchers, admission and limits as the rest of the API. Tensors come as JSON `data` or with the
binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`), and
outputs are returned in binary when asked (`binary_data`). The encoder also accepts encoded
image files as a BYTES tensor [-1] in binary form (each element a 4-byte little-endian length,
then the file), decoded with the service's own preprocessing; JSON has no way to carry binary
bytes, so BYTES in JSON `data` is refused. Errors are the protocol's `{"error": "..."}`.
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
from service.dependencies import RuntimeDep, require_api_key
from service.inputs import Parsed, validate_latents, validate_tensors
from service.repository import ModelNotFound, Served
from service.responses import FastJSON
from service.runtime import Runtime

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
keyed = [Depends(require_api_key)]
HEADER = "inference-header-content-length"
BAD = {400: {"description": 'a malformed request: `{"error": "..."}`'}}


class ProtocolError(errors.ApiError):
    status, code = 400, "invalid_inference_request"


@dataclass(frozen=True)
class Graph:
    """One graph of the loaded model as a V2 model."""

    name: str
    version: str
    versions: list[str]
    input: str
    input_shape: list[int]
    output: str
    output_shape: list[int]

    def config(self, settings: Any) -> dict[str, Any]:
        """Triton's model configuration (its extension): what Triton's tools, perf_analyzer
        among them, read to size their requests; dims leave out the batch dimension."""

        def tensor(name: str, shape: list[int]) -> dict[str, Any]:
            return {"name": name, "data_type": "TYPE_FP32", "dims": shape[1:]}

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": settings.max_batch_size,
            "input": [tensor(self.input, self.input_shape)],
            "output": [tensor(self.output, self.output_shape)],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)
            },
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.input, "datatype": "FP32", "shape": self.input_shape}],
            "outputs": [{"name": self.output, "datatype": "FP32", "shape": self.output_shape}],
        }


def graphs(runtime: Runtime) -> dict[str, tuple[str, dict[int, Served]]]:
    """V2 model name -> (graph, the served versions of its model)."""
    found = {}
    for name, versions in runtime.repository.served.items():
        for part in ("encoder", "decoder"):
            found[f"{name}-{part}"] = (part, versions)
    return found


def graph(runtime: Runtime, name: str, version: str | None) -> tuple[Graph, Served]:
    """The graph of one served version (the highest when `version` is None)."""
    part, versions = graphs(runtime).get(name, (None, {}))
    if part is None:
        raise ModelNotFound(f"no model {name!r}; this server has {sorted(graphs(runtime))}")
    if version is None:
        served = versions[max(versions)]
    elif version.isdigit() and int(version) in versions:
        served = versions[int(version)]
    else:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has "
                            f"{sorted(versions)}")  # fmt: skip
    model = served.model
    image, latent = [-1, *model.spec.shape], [-1, model.latent_dim]
    shapes = (("image", image), ("latent", latent))
    (inp, ins), (out, outs) = shapes if part == "encoder" else shapes[::-1]
    return Graph(name, str(model.version), [str(v) for v in sorted(versions)], inp, ins, out,
                 outs), served  # fmt: skip


# -- server and model metadata, health -----------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "convae-serve", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness (V2)")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness (V2)", responses={503: {}})
async def ready(request: Request) -> Response:
    runtime = request.app.state.runtime
    ok = runtime is not None and runtime.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", summary="Model metadata", dependencies=keyed, responses={404: {}})
async def model_metadata(name: str, runtime: RuntimeDep) -> dict:
    return graph(runtime, name, None)[0].metadata()


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    dependencies=keyed,
    responses={404: {}},
)
async def version_metadata(name: str, version: str, runtime: RuntimeDep) -> dict:
    return graph(runtime, name, version)[0].metadata()


@router.get("/models/{name}/config", summary="Model configuration (Triton's extension)",
            dependencies=keyed, responses={404: {}})  # fmt: skip
async def model_config(name: str, runtime: RuntimeDep) -> dict:
    return graph(runtime, name, None)[0].config(runtime.settings)


@router.get("/models/{name}/versions/{version}/config", summary="Model version configuration",
            dependencies=keyed, responses={404: {}})  # fmt: skip
async def version_config(name: str, version: str, runtime: RuntimeDep) -> dict:
    return graph(runtime, name, version)[0].config(runtime.settings)


@router.get("/models/{name}/ready", summary="Model readiness", dependencies=keyed,
            responses={404: {}})  # fmt: skip
async def model_ready(name: str, runtime: RuntimeDep) -> dict:
    graph(runtime, name, None)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness",
            dependencies=keyed, responses={404: {}})  # fmt: skip
async def version_ready(name: str, version: str, runtime: RuntimeDep) -> dict:
    graph(runtime, name, version)
    return {"name": name, "ready": True}


# -- inference ---------------------------------------------------------------------------------

INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {"inputs": {"type": "array"}},
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
async def infer(name: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _infer(*graph(runtime, name, None), request)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference of a version (V2)",
             dependencies=keyed, openapi_extra=INFER_DOC,
             responses={**BAD, 404: {}, 413: {}, 429: {}, 503: {}})  # fmt: skip
async def infer_version(name: str, version: str, request: Request, runtime: RuntimeDep):
    return await _infer(*graph(runtime, name, version), request)


async def _infer(target: Graph, served: Served, request: Request) -> Response:
    body = await request.body()
    head, binary = _split(body, request.headers.get(HEADER))
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the inference header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError('the request must be an object with an "inputs" list')
    if len(header["inputs"]) != 1:
        raise ProtocolError(f"model {target.name!r} takes one input, {target.input!r}")
    rows, count = _input(target, header["inputs"][0], binary, served)
    wanted = _outputs(target, header)
    with served.lease(), served.admit(count):  # the version finishes this request if retired
        if target.input == "image":
            if isinstance(rows, Parsed):
                _, result = await served.encoded(rows, f"v2:{target.name}")
            else:
                result = await served.encode(rows)
        else:
            result = await served.decode(rows)
    served.count(f"v2:{target.name}", count)
    return _response(target, header.get("id"), result, wanted)


def _split(body: bytes, declared: str | None) -> tuple[bytes, bytes]:
    if declared is None:
        return body, b""
    if not declared.strip().isdigit():
        raise ProtocolError(f"{HEADER} must be a whole number of bytes, got {declared!r}")
    length = int(declared)
    if length == 0 or length > len(body):
        raise ProtocolError(f"{HEADER} is {length}, the body has {len(body)} bytes")
    return body[:length], body[length:]


def _input(target: Graph, spec: Any, binary: bytes, served: Served) -> tuple[Any, int]:
    if not isinstance(spec, dict):
        raise ProtocolError("each input must be an object")
    if spec.get("name") != target.input:
        raise ProtocolError(f"model {target.name!r} has input {target.input!r}, got "
                            f"{spec.get('name')!r}")  # fmt: skip
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError("`shape` must be a list of non-negative integers")
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise ProtocolError(
            f"binary_data_size is {size!r}, the binary part of the body has {len(binary)} bytes"
        )
    if size is None and binary:
        raise ProtocolError("the body has binary data but no input declares binary_data_size")
    limit = served.settings.max_images_per_request
    if shape and shape[0] > limit:
        raise errors.TooManyImages(f"{shape[0]} rows in one request; the limit is {limit}")
    if datatype == "BYTES" and target.input == "image":
        return _files(shape, binary if size is not None else None), shape[0] if shape else 0
    if datatype != "FP32":
        raise ProtocolError(f"input {target.input!r} is FP32" + (
            " (or BYTES of encoded image files)" if target.input == "image" else "")
            + f", got {datatype!r}")  # fmt: skip
    expected = [d if d > 0 else None for d in target.input_shape]
    if len(shape) != len(expected) or any(e is not None and e != d for e, d in
                                          zip(expected, shape, strict=True)):  # fmt: skip
        raise ProtocolError(f"input {target.input!r} has shape {target.input_shape}, got {shape}")
    count = math.prod(shape)
    if size is not None:
        if size != 4 * count:
            raise ProtocolError(f"shape {shape} needs {4 * count} bytes of FP32, got {size}")
        array = np.frombuffer(binary, "<f4").reshape(shape)
    else:
        array = _json_data(spec.get("data"), count).reshape(shape)
    if target.input == "image":
        return validate_tensors(array.astype(np.float32), served.model.spec), shape[0]
    return validate_latents(array, served.model.latent_dim), shape[0]


def _json_data(data: Any, count: int) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ProtocolError("`data` must be a (nested) list of numbers") from None
    if array.size != count:
        raise ProtocolError(f"`data` holds {array.size} values, the shape needs {count}")
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


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


def _outputs(target: Graph, header: dict) -> bool:
    """Whether the output is asked for in binary (default: JSON)."""
    binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs = header.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise ProtocolError(f"model {target.name!r} has one output, {target.output!r}")
    if outputs[0].get("name") != target.output:
        raise ProtocolError(f"model {target.name!r} has output {target.output!r}, got "
                            f"{outputs[0].get('name')!r}")  # fmt: skip
    return bool((outputs[0].get("parameters") or {}).get("binary_data", binary))


def _response(target: Graph, request_id: Any, result: np.ndarray, binary: bool) -> Response:
    result = np.ascontiguousarray(result, np.float32)
    output: dict[str, Any] = {"name": target.output, "datatype": "FP32",
                              "shape": list(result.shape)}  # fmt: skip
    body: dict[str, Any] = {"model_name": target.name, "model_version": target.version}
    if isinstance(request_id, str):
        body["id"] = request_id
    if not binary:
        body["outputs"] = [{**output, "data": result.ravel()}]
        return FastJSON(body)
    data = result.astype("<f4").tobytes()
    body["outputs"] = [{**output, "parameters": {"binary_data_size": len(data)}}]
    head = orjson.dumps(body)
    return Response(head + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
