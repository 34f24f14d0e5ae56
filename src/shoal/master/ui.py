"""The web dashboard at `/ui`: static files from package data (`shoal/web/static`).

Why no build step: the dashboard is one HTML shell, one CSS file and a dozen small ES modules
of plain modern JavaScript, served as they are kept in the source tree. Browsers load ES
modules natively, so there is no bundler, no npm, no node_modules and no lock file to keep
up: an installed shoal has everything its dashboard needs, nothing is fetched from a CDN
(machines of a cluster often reach no internet), and a change is tested by reloading. The
cost (a few more requests than one bundle, preloaded with `modulepreload`) is nothing next to
a listing of a thousand nodes.

Who may do what: these files need no token and hold nothing secret. The pages call the JSON
API (`/v1/...`) with the API token the user pasted at login, kept in the tab's
sessionStorage and sent as `Authorization: Bearer`: no cookie, so no cross-site request can
borrow it (no CSRF to guard against), and the API checks every call's role as it does for
the CLI. The stream (`GET /v1/stream`) is read with fetch() and a ReadableStream, since
EventSource cannot send that header. A content security policy allows scripts, styles and
calls from this origin only: text from the cluster (job names, labels) can never run.

The files are read once, at the first request, and answered with an ETag and `no-cache`:
browsers ask again each load and get a 304 while the files are the same.
"""

from __future__ import annotations

import functools
import hashlib
import mimetypes
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response

router = APIRouter(include_in_schema=False)

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def _walk(folder: Traversable, prefix: str = "") -> dict[str, Asset]:
    found: dict[str, Asset] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            found |= _walk(entry, name + "/")
        elif not entry.name.startswith("."):
            body = entry.read_bytes()
            suffix = "." + entry.name.rpartition(".")[2]
            media = TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            found[name] = Asset(body, media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return found


@functools.cache
def assets() -> dict[str, Asset]:
    """Every file of the dashboard by its path under /ui/, read once."""
    return _walk(files("shoal.web") / "static")


def _answer(request: Request, asset: Asset) -> Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/ui")
@router.get("/ui/")
async def index(request: Request) -> Response:
    """The shell of every page: the page itself is chosen by the URL's fragment (#/jobs)."""
    return _answer(request, assets()["index.html"])


@router.get("/ui/{path:path}")
async def asset(path: str, request: Request) -> Response:
    found = assets().get(path)
    if found is None:
        return Response(b"not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
    return _answer(request, found)
