"""The web dashboard at `/ui`: static files from package data (`shoal/web/static`).

Why no build step: the dashboard is one HTML shell, one CSS file and a dozen small ES modules
of plain modern JavaScript, served as they are kept in the source tree. Browsers load ES
modules natively, so there is no bundler, no npm, no node_modules and no lock file to keep
up: an installed shoal has everything its dashboard needs, nothing is fetched from a CDN
(machines of a cluster often reach no internet), and what the source tree holds is what
runs. The cost, a few more requests than one bundle would make at a first visit (preloaded
with `modulepreload`, cached for good after: below), is nothing next to a thousand nodes'
listing.

Who may do what: these files need no token and hold nothing secret. The pages call the JSON
API (`/v1/...`) with the API token the user pasted at login, kept in the tab's
sessionStorage and sent as `Authorization: Bearer`: no cookie, so no cross-site request can
borrow it (no CSRF to guard against), and the API checks every call's role as it does for
the CLI. The stream (`GET /v1/stream`) is read with fetch() and a ReadableStream, since
EventSource cannot send that header. A content security policy allows scripts, styles and
calls from this origin only: text from the cluster (job names, labels) can never run.

Caching without a build step: the files are read once, at the first request, and each is
named in the page by a version, a digest of its content (`/ui/js/app.js?v=...`). The shell
(index.html, answered `no-cache`: browsers ask again at each load, and get a 304 while it
is the same) names the stylesheet so, and maps every module to its versioned name with an
import map; a versioned name is answered as cached for good (`immutable`). A page loaded
again asks for nothing but the shell, and a new shoal's files are new names, never a mix of
old and new. The import map is the one inline script, allowed by its digest in the policy.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response

router = APIRouter(include_in_schema=False)

POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FOREVER = "public, max-age=31536000, immutable"  # a versioned name: its content never changes
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    version: str  # a digest of the body

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass(frozen=True, slots=True)
class Site:
    assets: dict[str, Asset]  # by path under /ui/
    index: Asset  # the shell, with its references versioned and its import map
    policy: str  # the content security policy, the import map's digest in it


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
            found[name] = Asset(body, media, hashlib.sha256(body).hexdigest()[:20])
    return found


@functools.cache
def site() -> Site:
    """The dashboard's files, read once, and its shell made from them."""
    assets = _walk(files("shoal.web") / "static")
    versioned = {f"/ui/{path}": f"/ui/{path}?v={a.version}" for path, a in assets.items()}
    modules = {name: url for name, url in versioned.items() if name.endswith(".js")}
    importmap = json.dumps({"imports": modules}, separators=(",", ":"), sort_keys=True)
    shell = assets["index.html"].body.decode()
    shell = re.sub(r'(href|src)="(/ui/[^"?]+)"', lambda m: f'{m[1]}="{versioned.get(m[2], m[2])}"', shell)
    shell = shell.replace("<!-- importmap -->", f'<script type="importmap">{importmap}</script>', 1)
    body = shell.encode()
    digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
    policy = POLICY.replace("script-src 'self'", f"script-src 'self' 'sha256-{digest}'")
    return Site(assets, Asset(body, TYPES[".html"], hashlib.sha256(body).hexdigest()[:20]), policy)


def _answer(request: Request, asset: Asset, policy: str) -> Response:
    headers = {**HEADERS, "Content-Security-Policy": policy, "ETag": asset.etag}
    if request.query_params.get("v") == asset.version:
        headers["Cache-Control"] = FOREVER
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/ui")
@router.get("/ui/")
async def index(request: Request) -> Response:
    """The shell of every page: the page itself is chosen by the URL's fragment (#/jobs)."""
    found = site()
    return _answer(request, found.index, found.policy)


@router.get("/ui/{path:path}")
async def asset(path: str, request: Request) -> Response:
    found = site()
    if path not in found.assets:
        return Response(b"not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
    return _answer(request, found.assets[path], found.policy)
