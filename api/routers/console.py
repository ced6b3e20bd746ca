"""/ui: the web console. A page and a few plain ES modules served by the API process itself (no build step,
no Node at run time, no CDN: the chart library is vendored under api/console/assets/vendor). The API key
lives in the browser's sessionStorage only and goes out as the Authorization header of the console's own
requests; the page allows no inline script (Content-Security-Policy)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

router = APIRouter(include_in_schema=False)
CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
ASSETS_PATH = "/ui/assets"
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Always revalidated (ETag): a new release's assets are picked up at once.
    "Cache-Control": "no-cache",
}


class ConsoleAssets(StaticFiles):
    """The console's scripts and styles, with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def assets() -> StaticFiles:
    """The console's assets, for the app to mount at ASSETS_PATH."""
    return ConsoleAssets(directory=CONSOLE_DIR / "assets")


@router.get("/ui")
async def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)
