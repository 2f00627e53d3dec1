"""The clinicians' page: plain HTML, CSS and JavaScript shipped in the package, served at ``GET /``.

No build step and nothing fetched from anywhere else (hospital networks are air-gapped): the files
in ``static/`` are served as they are, under a Content-Security-Policy that admits only this origin,
so a stray external URL, inline script or inline style fails in the browser (and in the browser
tests) instead of quietly reaching out. The page holds no data and needs no token itself; it calls
the API (``/v1/model``, ``/v1/predict``) with the token the user types, which it keeps in one
JavaScript variable only (never a URL, a cookie or web storage). Framework-free, like
:mod:`pneumonet.scoring.uploads`; the endpoint wires it to its routes.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

PAGE = "index.html"
ASSETS = {
    PAGE: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# blob: shows the clinician's own file, data: the Grad-CAM PNGs of the API's JSON; form-action 'none'
# keeps a token form from ever being submitted into a URL, even with JavaScript off.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release of the package must not meet an old page
}


@cache
def asset(name: str) -> tuple[bytes, str] | None:
    """The bytes and media type of one shipped file, or None for any other name."""
    if name not in ASSETS:
        return None
    return files(__package__).joinpath("static", name).read_bytes(), ASSETS[name]
