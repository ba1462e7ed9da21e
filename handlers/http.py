"""What the HTTP notification handlers share: one pooled httpx client per handler,
opened in `start()` and closed in `close()`, and how a peer's answer becomes success,
`Retry` or `Fail`."""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any

import httpx
from pydantic import ConfigDict, Field

from handlers import Fail, HandlerOptions, Retry
from receiver import tracing
from receiver.masking import origin

# A peer asking for a longer pause than this is waited on for this long: a typo in a
# Retry-After header should not park an event for days.
MAX_RETRY_AFTER_SECONDS = 3600.0
USER_AGENT = "ci-receiver"


class HttpOptions(HandlerOptions):
    model_config = ConfigDict(populate_by_name=True)

    # Seconds for each of connecting, writing and reading. Keep it below the handler's
    # `timeout`, which bounds the whole attempt.
    request_timeout: float = Field(10.0, gt=0)
    max_connections: int = Field(10, ge=1)


class HttpHandler:
    """Base of the handlers that POST to a peer."""

    options: HttpOptions

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.options.request_timeout,
            limits=httpx.Limits(
                max_connections=self.options.max_connections,
                max_keepalive_connections=self.options.max_connections,
            ),
            headers={"User-Agent": USER_AGENT},
            # A moved endpoint is a configuration error to fix, not something to chase.
            follow_redirects=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post(self, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        """POST, with the trace's `traceparent` when tracing is on; a timeout or a transport
        error (peer down, reset) is a `Retry`."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        # The attempt's trace goes on with the delivery (W3C `traceparent`), when tracing
        # is on: a peer that traces continues it.
        trace = tracing.carrier()
        if trace:
            headers = httpx.Headers(kwargs.get("headers"))
            headers.update(trace)
            kwargs["headers"] = headers
        try:
            return await self._client.post(url, **kwargs)
        except httpx.TimeoutException as exc:
            raise Retry(f"{origin(str(url))} timed out ({type(exc).__name__})") from exc
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            # The request cannot be made as configured: trying again cannot help, and the
            # client's words may quote a header's value (a secret).
            raise Fail(
                f"cannot send to {origin(str(url))}: {type(exc).__name__} (a header or the"
                " URL as configured is not valid HTTP)"
            ) from None
        except httpx.TransportError as exc:
            raise Retry(f"cannot reach {origin(str(url))}: {type(exc).__name__}: {exc}") from exc


def check_status(response: httpx.Response) -> None:
    """2xx passes; 408, 429 and 5xx are retried (after `Retry-After` when given); any
    other status fails at once: the request itself is wrong (bad URL, token, payload)."""
    if response.is_success:
        return
    status = response.status_code
    summary = f"{origin(str(response.request.url))} answered {status}: {excerpt(response)}"
    if status in (408, 429) or status >= 500:
        raise Retry(summary, after=retry_after(response))
    raise Fail(summary)


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (a number or an HTTP date), capped; None when absent."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds) or seconds <= 0:
        # "Now" (0, or a date already past: the clocks disagree): the back-off's step, so
        # a peer saying so cannot spend every attempt within a second.
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def excerpt(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"
