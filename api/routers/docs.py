"""/docs (Swagger UI) and /redoc: the API's reference pages, their scripts and styles served by the API itself
from the pinned fastapi-offline package (no CDN), so they load on an isolated network."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)
# Swagger UI 5 and ReDoc 2 bundles, with a favicon.
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_PATH = "/docs-assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
# ReDoc's sidebar shows Redocly's logo from their CDN; the bundle served here shows the local favicon instead.
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@lru_cache(maxsize=1)
def _redoc_bundle() -> bytes:
    text = (ASSETS_DIR / "redoc.standalone.js").read_text(encoding="utf-8")
    return text.replace(REDOC_CDN_LOGO, f"{ASSETS_PATH}/favicon.png").encode()


def assets() -> StaticFiles:
    """The pages' scripts, styles and favicon, for the app to mount at ASSETS_PATH."""
    return StaticFiles(directory=ASSETS_DIR)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
    )


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(f"{ASSETS_PATH}/redoc.standalone.js")
async def redoc_bundle() -> Response:
    """ReDoc's bundle, with nothing in it that loads from outside (routes match before the assets' mount)."""
    return Response(
        _redoc_bundle(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )
