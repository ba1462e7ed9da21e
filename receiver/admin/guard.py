"""What keeps another web site from acting through an operator's browser.

A browser sends Basic credentials (and reaches an open loopback listener) whatever page
made the request, so every request that changes something must come from the
inspector's own pages, or from a script:
- the browser says where a request comes from (`Sec-Fetch-Site`, `Origin`): another
  site is refused;
- a form of the inspector carries a token that only its own pages know: the value of a
  cookie set for this listener (`SameSite=Strict`, so never sent along by another site),
  repeated in a hidden field; another site can neither read the one nor set the other;
- the JSON API takes only `application/json`, which no form of another site can send
  without the browser asking first (and nothing here answers that question).
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

CSRF_COOKIE = "ci_receiver_csrf"
CSRF_FIELD = "csrf"


def cross_site(request: Request) -> str | None:
    """Why the request looks sent by a page of another site; None when it does not."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"sent from another site (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("origin")
    if origin is None:
        return None  # a script, or a browser too old to say: the token decides
    host = request.headers.get("host", "").lower()
    if origin == "null" or urlsplit(origin).netloc.lower() != host:
        return f"sent from another origin ({origin})"
    return None


def replay_refusal(request: Request) -> str | None:
    """Why this request may not replay: credentials that may only look, or a page of
    another site; None when it may."""
    if request.state.access != "write":
        return "these credentials may only look: replaying needs admin.token or admin.basic_auth"
    return cross_site(request)


def csrf_token(request: Request) -> str:
    """The token this browser's forms carry: its cookie's, or a new one (set it with
    `keep_csrf_token`)."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)


def keep_csrf_token(response: Response, request: Request, token: str) -> None:
    if request.cookies.get(CSRF_COOKIE) != token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/")


def csrf_valid(request: Request, submitted: object) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode())
