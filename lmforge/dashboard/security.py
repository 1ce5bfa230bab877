"""Who may talk to the dashboard, and which writes are accepted.

- **Token**: when one is set, every request carries it: the ``lmforge_token`` cookie (set by opening any page once
  with ``?token=T``), an ``Authorization: Bearer T`` header or an ``X-Lmforge-Token`` header.  Others get 401.
- **Annotators**: on a dashboard with a token, an annotator of a labelling project opens ``/?annotator_token=A`` once
  (their own token, from the project page) and gets the ``lmforge_annotator`` cookie: it opens their assignment
  (``/label/PROJECT/as/NAME``) and nothing else, so an annotator sees and edits only their own labels.
- **Host check**: on loopback the ``Host`` header must name loopback (a DNS-rebinding page cannot reach the app).
- **Writes** (POST/PUT/PATCH/DELETE): the ``Origin`` (or ``Referer``) must be this server and the request must carry
  the CSRF token (url-encoded form field ``csrf`` or header ``X-CSRF-Token``) that every page embeds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Callable
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

COOKIE = "lmforge_token"
ANNOTATOR_COOKIE = "lmforge_annotator"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class Guard:
    def __init__(self, token: str | None, allowed_hosts: set[str] | None = None) -> None:
        self.token = token or None
        self.allowed_hosts = allowed_hosts
        self._secret = secrets.token_bytes(32)
        self.csrf_token = hmac.new(self._secret, b"csrf:" + (token or "").encode(), hashlib.sha256).hexdigest()[:32]
        self.annotator_of: Callable[[str], tuple[str, str] | None] = lambda token: None  # set by the app

    def token_ok(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = [request.cookies.get(COOKIE, ""), request.headers.get("x-lmforge-token", "")]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        return any(g and hmac.compare_digest(g, self.token) for g in given)

    def host_ok(self, request: Request) -> bool:
        if self.allowed_hosts is None:
            return True
        host = (request.headers.get("host") or "").rsplit(":", 1)[0] if not (request.headers.get("host") or "").startswith("[") \
            else (request.headers.get("host") or "").split("]")[0] + "]"
        return host in self.allowed_hosts

    def same_origin(self, request: Request) -> bool:
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source:
            return False
        parts = urlsplit(source)
        return parts.netloc == request.headers.get("host", "")

    def csrf_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given, self.csrf_token)


def _deny(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    body = (f"<!doctype html><meta charset=utf-8><title>lmforge dashboard</title>"
            f"<link rel=stylesheet href=/static/style.css><main><h1>lmforge dashboard</h1>"
            f"<p class=problem>{message}</p></main>")
    return HTMLResponse(body, status_code=status)


def install(app: FastAPI) -> None:
    guard: Guard = app.state.guard

    @app.middleware("http")
    async def protect(request: Request, call_next):
        if not guard.host_ok(request):
            return _deny(request, 421, "Host header not allowed: open the dashboard through 127.0.0.1 or localhost.")
        given = request.query_params.get("token")
        if guard.token is not None and given is not None and request.method == "GET":
            if not hmac.compare_digest(given, guard.token):
                return _deny(request, 401, "Wrong token.")
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            resp = RedirectResponse(target, status_code=303)
            resp.set_cookie(COOKIE, guard.token, httponly=True, samesite="strict")
            return resp
        given_annotator = request.query_params.get("annotator_token")
        if given_annotator is not None and request.method == "GET":  # an annotator signs in: their page, a cookie
            who = guard.annotator_of(given_annotator)
            if who is None:
                return _deny(request, 401, "Wrong annotator token.")
            resp = RedirectResponse(f"/label/{quote(who[0])}/as/{quote(who[1])}", status_code=303)
            resp.set_cookie(ANNOTATOR_COOKIE, given_annotator, httponly=True, samesite="strict")
            return resp
        if not guard.token_ok(request) and not request.url.path.startswith("/static/"):
            who = guard.annotator_of(request.cookies.get(ANNOTATOR_COOKIE, ""))
            if who is not None:
                own = f"/label/{quote(who[0])}/as/{quote(who[1])}"
                if request.url.path in ("/", "/label"):
                    return RedirectResponse(own, status_code=303)
                if request.url.path != own and not request.url.path.startswith(own + "/"):
                    return _deny(request, 403, f"Signed in as annotator {who[1]} of project {who[0]}: only "
                                               f"<a href=\"{own}\">your assignment</a> is open to you.")
            else:
                return _deny(request, 401, "This dashboard needs its access token: open it once as "
                                           "<code>http://HOST:PORT/?token=YOUR_TOKEN</code> (or send the "
                                           "<code>Authorization: Bearer</code> header); annotators open their "
                                           "own link (<code>/?annotator_token=…</code>).")
        if request.method not in SAFE_METHODS:
            if not guard.same_origin(request):
                return _deny(request, 403, "Cross-origin request refused (Origin/Referer is not this dashboard).")
            header = request.headers.get("x-csrf-token")
            if header is None:
                ctype = request.headers.get("content-type", "")
                if ctype.startswith("application/x-www-form-urlencoded"):
                    header = (parse_qs((await request.body()).decode("utf-8", "replace")).get("csrf") or [None])[0]
            if not guard.csrf_ok(header if isinstance(header, str) else None):
                return _deny(request, 403, "Missing or wrong CSRF token: reload the page and submit again.")
        response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response
