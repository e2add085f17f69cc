"""The model repository: what is served (GET /models) and Triton's repository extension
(`POST /v2/repository/index`, `…/models/{name}/load`, `…/unload`), behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.dependencies import RuntimeDep, require_api_key
from service.responses import FastJSON
from service.schemas import KEYED_ERRORS, V2_ERRORS

router = APIRouter(tags=["model repository"], dependencies=[Depends(require_api_key)])


@router.get("/models", summary="Every model version in the repository and its state",
            responses=KEYED_ERRORS)  # fmt: skip
async def models(runtime: RuntimeDep) -> FastJSON:
    default = runtime.default()
    return FastJSON({"default": default.ref(), "models": runtime.repository.index()})


@router.post("/v2/repository/index", summary="Repository index (Triton's extension)",
             responses=V2_ERRORS)  # fmt: skip
async def index(runtime: RuntimeDep) -> FastJSON:
    return FastJSON(runtime.repository.index())


@router.post("/v2/repository/models/{name}/load", summary="Load a model's versions now",
             responses=V2_ERRORS)  # fmt: skip
async def load(name: str, runtime: RuntimeDep) -> FastJSON:
    await runtime.repository.load(name)
    return FastJSON({})


@router.post("/v2/repository/models/{name}/unload", summary="Unload every version of a model",
             responses=V2_ERRORS)  # fmt: skip
async def unload(name: str, runtime: RuntimeDep) -> FastJSON:
    await runtime.repository.unload(name)
    return FastJSON({})
