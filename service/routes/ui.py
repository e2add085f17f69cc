"""The demo page (GET /, its static assets) and the model's report figures, read-only.

The page and its assets are public: they hold no data, and the page must load to ask for the
API key. The report figures are model data, so they need the key like GET /model.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from service.errors import NotFound
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import KEYED_ERRORS, ErrorBody

STATIC = Path(__file__).resolve().parent.parent / "static"
_ASSET_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
_FIGURE_TYPES = {".png": "image/png"}
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a redeploy shows the new page
# Browsers must not guess a type: a response is only what its Content-Type says.
_ASSET_HEADERS = {**_NO_CACHE, "X-Content-Type-Options": "nosniff"}
# What the page itself needs, nothing more: its own script and style (no inline code), the
# images it shows (its own figures, base64 PNGs from the API as data: URLs, uploads as blob:
# URLs), fetch() to the API and of the data: URL it turns a noisy canvas into. Injected markup
# can then run no script, and no other site can frame the page.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_PAGE_HEADERS = {**_ASSET_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}

router = APIRouter(tags=["operations"])


class ReportFigures(BaseModel):
    figures: list[str]


def _files(folder: Path, types: dict[str, str]) -> dict[str, Path]:
    """The files of an allowed type right inside `folder`, by name (symlinks out excluded)."""
    root = folder.resolve()
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.suffix.lower() in types and p.is_file() and p.resolve().parent == root
    }


def _listed(folder: Path, name: str, types: dict[str, str]) -> Path:
    """`folder/name` when it is one of `_files(folder, types)`, else 404.

    The name is matched against the folder's own listing, so `..`, slashes, encoded separators
    and symlinks leading out of the folder never reach the filesystem.
    """
    path = _files(folder, types).get(name)
    if path is None:
        raise NotFound(f"no such file: {name!r}")
    return path


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    path = _listed(STATIC, name, _ASSET_TYPES)
    media_type = _ASSET_TYPES[path.suffix.lower()]
    return FileResponse(path, media_type=media_type, headers=_ASSET_HEADERS)


@router.get(
    "/model/report",
    summary="The names of the model's report figures",
    response_model=ReportFigures,
    responses=KEYED_ERRORS,
    openapi_extra=SERVED_OPENAPI,
)
async def report_figures(request: Request) -> ReportFigures:
    with serving(request) as served:
        return ReportFigures(figures=list(_files(served.model.folder / "report", _FIGURE_TYPES)))


@router.get(
    "/model/report/{name}",
    summary="One report figure (PNG) of the model in use",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the figure",
        },
        404: {"model": ErrorBody, "description": "no PNG of that name in the report folder"},
        **KEYED_ERRORS,
    },
    openapi_extra=SERVED_OPENAPI,
)
async def report_figure(request: Request, name: str) -> FileResponse:
    with serving(request) as served:
        path = _listed(served.model.folder / "report", name, _FIGURE_TYPES)
        return FileResponse(path, media_type="image/png")
