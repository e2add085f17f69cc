"""The model repository: what is served (GET /models) and Triton's repository extension
(`POST /v2/repository/index`, `…/models/{name}/load`, `…/unload`), behind the API key.

Reading is always allowed; loading and unloading only with AE_MODEL_CONTROL=explicit (403
otherwise), and never leave the default model unserved (409). They work whatever state the
server is in, so a load can repair a server that is not ready.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.responses import FastJSON
from service.routes.dependencies import RepositoryDep, require_api_key
from service.schemas import KEYED_ERRORS, V2_ERRORS, ProtocolErrorBody

router = APIRouter(tags=["model repository"], dependencies=[Depends(require_api_key)])

CONTROL_ERRORS = {
    **V2_ERRORS,
    400: {"model": ProtocolErrorBody, "description": "no version of the model loaded"},
    403: {"model": ProtocolErrorBody, "description": "model control is off (AE_MODEL_CONTROL)"},
}


@router.get("/models", summary="Every model version in the repository and its state",
            responses=KEYED_ERRORS)  # fmt: skip
async def models(repository: RepositoryDep) -> FastJSON:
    default = repository.served.get(repository.settings.model_name)
    ref = None if not default else default[max(default)].ref()
    return FastJSON({"default": ref, "models": repository.index()})


@router.post("/v2/repository/index", summary="Repository index (Triton's extension)",
             responses=V2_ERRORS)  # fmt: skip
async def index(repository: RepositoryDep) -> FastJSON:
    return FastJSON(repository.index())


@router.post(
    "/v2/repository/models/{name}/load",
    summary="Load a model's versions now (AE_MODEL_CONTROL=explicit)",
    responses=CONTROL_ERRORS,
)
async def load(name: str, repository: RepositoryDep) -> FastJSON:
    await repository.load(name)
    return FastJSON({})


@router.post(
    "/v2/repository/models/{name}/unload",
    summary="Unload every version of a model (AE_MODEL_CONTROL=explicit; never the default)",
    responses={**CONTROL_ERRORS,
               409: {"model": ProtocolErrorBody, "description": "the default model"}},
)  # fmt: skip
async def unload(name: str, repository: RepositoryDep) -> FastJSON:
    await repository.unload(name)
    return FastJSON({})
