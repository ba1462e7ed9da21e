"""Configuration: one TOML file, every key overridable by a `CI_RECEIVER_*` variable.

`CI_RECEIVER_HTTP__PORT=9000` overrides `[http] port` (double underscore between
levels); `${NAME}` inside a TOML string is replaced by the environment variable NAME
(`receiver.envvars` reads both). With no file at all the embedded default applies:
SQLite inbox in `./ci-receiver-data`, the `log` handler on every event, port 8080.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from receiver import envvars, rates
from receiver.callback.decode import DEFAULT_LIMITS, Limits
from receiver.callback.matching import FIELDS
from receiver.masking import SECRET_NAME, mask_credentials, mask_url
from receiver.spelling import did_you_mean
from receiver.timezones import check_timezone

CONFIG_ENV = "CI_RECEIVER_CONFIG"
ENV_PREFIX = envvars.PREFIX
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
# What the Pulsar client takes as a service URL ([tdmq] and the pulsar handler alike):
# the binary protocol, or HTTP lookup (the address the TDMQ console shows is http://).
PULSAR_SERVICE_URL = r"^(pulsar(\+ssl)?|https?)://"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key or variable."""


# What every table of the config is: each field's docstring is its description
# (model_fields[name].description), which the documentation site's configuration
# reference is made from; no number is infinite or NaN (TOML has `inf` and `nan`): a lease
# of `inf` seconds, for one, is no lease.
TABLE = ConfigDict(use_attribute_docstrings=True, allow_inf_nan=False)


class Section(BaseModel):
    model_config = ConfigDict(**TABLE, extra="forbid")


# The run of the built-in verification step (receiver/ci/verify.py), which the inbox stores
# beside the held runs of an event from a source with `verify = "ci-api"`: a name no
# configured handler may take.
VERIFY_RUN = "(verify)"

# `verify` of a source: "ci-api" holds each of its events from handlers until CI's job
# query API confirms it ([ci] credentials needed; see receiver/ci/verify.py).
Verify = Literal["none", "ci-api"]


# The sections with a `verify` key, and the event sources each one's events come as: a
# CMQ topic's push arrives over HTTP.
VERIFYING_SECTIONS = {"http": ("http", "cmq-push"), "tdmq": ("tdmq",), "cmq": ("cmq",)}


class Listener(Section):
    """What the two HTTP listeners ([http], [admin]) share: where they listen (each
    section has its own defaults), and HTTPS when configured (receiver/sources/tls.py)."""

    host: str
    """The address the listener binds."""
    port: int = Field(ge=0, le=65535)
    """The listener's port."""
    tls_cert: Path | None = None
    """The certificate chain (PEM: the server's certificate, then the intermediates) to
    serve this listener over HTTPS with; with `tls_key`. Read at start and again on
    SIGHUP, so that a renewed certificate is served without a restart. Unset: plain
    HTTP."""
    tls_key: Path | None = None
    """The private key (PEM) of `tls_cert`."""
    tls_key_password: SecretStr | None = None
    """The password of `tls_key`, when it is encrypted."""

    @model_validator(mode="after")
    def _tls_cert_and_key(self) -> Listener:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(f"tls_cert and tls_key go together: set {missing} too (or neither)")
        if self.tls_key_password is not None and self.tls_key is None:
            raise ValueError("tls_key_password is set without tls_cert and tls_key")
        return self

    @property
    def scheme(self) -> str:
        """`https` for a listener that serves TLS, else `http`."""
        return "http" if self.tls_cert is None else "https"


class HttpConfig(Listener):
    """`[http]`: the public listener CI posts its callbacks to, who may post, and the
    bounds on every request."""

    host: str = "0.0.0.0"
    """The address the public listener binds (`serve --host` overrides it)."""
    port: int = Field(8080, ge=0, le=65535)
    """The public listener's port (`serve --port` overrides it)."""
    tokens: list[SecretStr] = []
    """When set, callbacks are only accepted on /callbacks/<one of these> (letters, digits,
    `-`, `_`, `.`, `~`: a path segment; make it long and random)."""

    @field_validator("tokens")
    @classmethod
    def _tokens_fit_in_a_url(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for index, token in enumerate(tokens):
            if not _URL_SAFE.fullmatch(token.get_secret_value()):
                raise ValueError(
                    f"token {index + 1} must be letters, digits, '-', '_', '.' or '~' (it is a path"
                    " segment), and not empty"
                )
        return tokens

    access_log: bool = True
    """One log line per request: method, route (never a token), status, ms, client."""
    workers: int = Field(1, ge=1, le=64)
    """Processes serving the port (`serve` only): each takes connections from one shared
    listening socket and runs ingest and a dispatcher over the shared inbox; 1 serves
    in the command's own process, as without it (docs: Operations, "Several worker
    processes")."""
    graceful_timeout: float = Field(10.0, gt=0)
    """Seconds to let in-flight requests finish after SIGTERM."""
    verify: Verify = "none"
    """`ci-api`: each event of a callback posted here (a CMQ push too) waits for CI's job
    API to confirm it before any handler runs ([ci] credentials and buckets needed)."""

    # --- who may post (besides tokens) ---
    basic_auth: dict[str, SecretStr] = {}
    """HTTP Basic credentials, `{username = "password"}`; with tokens too, either one lets
    a callback in."""
    allow_from: list[IPvAnyNetwork] = []
    """Only these addresses (CIDRs) may post; empty: any address."""
    trusted_proxies: list[IPvAnyNetwork] = []
    """X-Forwarded-For is read only from these (the load balancer in front)."""
    auth_failures_per_minute: int = Field(30, ge=0)
    """Failed authentications per address (IPv6: per /64) and minute before 429; 0: no limit."""
    require_auth: bool = False
    """Whether `serve` and `run` refuse to start when none of tokens, basic_auth and
    allow_from is set, rather than warn and take callbacks from anyone. Off by default, so
    that the embedded default runs as it is on a development machine; the container image
    turns it on (CI_RECEIVER_HTTP__REQUIRE_AUTH=true), so that a deployment open to the
    world is one somebody asked for."""

    # --- bounds on every request ---
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    """Bytes of the request line and headers; past it `431`, decided before the body is
    read."""
    max_headers: int = Field(100, ge=10)
    """Headers in one request; past it `431`."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds for the head to arrive, else `408` (a connection that sends nothing is
    closed)."""
    body_timeout: float = Field(30.0, gt=0)
    """Seconds for the body, from the end of the head, else `408`."""
    keepalive_timeout: float = Field(5.0, gt=0)
    """Seconds an idle keep-alive connection stays open."""
    max_connections: int | None = Field(None, ge=1)
    """Open connections beyond which new ones are answered 503 + Retry-After, then closed.
    Unset: as many as the open files limit allows next to a reserve for the inbox,
    handlers and logs, up to 10,000 (receiver/sources/http_server.py)."""
    max_inflight_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    """Callbacks in progress are bounded by the memory they hold: their bodies' bytes
    (Content-Length, or read so far) plus a constant each. One that does not fit waits
    up to `admission_wait` seconds for room before a 503 + Retry-After: a burst of
    honest callbacks is taken in, not refused (CI documents no retry)."""
    admission_wait: float = Field(10.0, ge=0)
    """Seconds a callback waits for room under `max_inflight_bytes` before `503` +
    Retry-After."""
    max_large_requests: int = Field(8, ge=1)
    """Callbacks in progress with a body over 64 KiB (decoded one at a time; several times
    their size meanwhile); past it `503` + Retry-After."""
    max_requests: int = Field(16384, ge=1)
    """A safety net far above any burst: requests in the app at once (each connection
    runs one at a time), beyond which new ones get 503 at once."""

    @field_validator("basic_auth")
    @classmethod
    def _basic_auth_usable(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _usable_users(users)

    @property
    def authenticated(self) -> bool:
        """Whether anything keeps strangers from posting."""
        return bool(self.tokens or self.basic_auth or self.allow_from)


class LimitsConfig(Section):
    """`[limits]`: what one callback may hold, over HTTP, CMQ and TDMQ alike; enforced
    while parsing, so an XML bomb stops at its first element past a limit."""

    max_bytes: int = Field(DEFAULT_LIMITS.max_bytes, gt=0)
    """Bytes of one callback's body; over HTTP past it `413 too_large`."""
    max_depth: int = Field(DEFAULT_LIMITS.max_depth, gt=0, le=200)
    """Nesting depth of the decoded document (an XML element that repeats is a list of
    objects: two levels). At most 200: a deeper document could not be written out as JSON
    again (orjson stops at 254 levels, and the Event nests the document two levels down)."""
    max_elements: int = Field(DEFAULT_LIMITS.max_elements, gt=0)
    """XML elements (their attributes count too) or JSON values in one callback."""
    max_events: int = Field(DEFAULT_LIMITS.max_events, gt=0)
    """Events one callback may give (`JobsDetail` entries)."""

    def to_limits(self) -> Limits:
        return Limits(**self.model_dump())


class InboxConfig(Section):
    """`[inbox]`: the SQLite file (the default), or a PostgreSQL database that any number
    of receivers and consumers share."""

    url: str | None = Field(None, pattern=r"^postgres(ql)?://")
    """A PostgreSQL inbox that any number of processes share:
    postgresql://user:password@host:5432/db (password URL-encoded; `${PW}` reads it from
    the environment). Unset: the SQLite file at `path`."""
    postgres_schema: str = Field("ci_receiver", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """The PostgreSQL schema holding the inbox's tables (created when missing), so that they
    never meet the tables of a `sql` handler on the same database."""
    pool_size: int = Field(10, ge=2, le=1000)
    """Connections each process keeps to PostgreSQL."""
    path: Path | None = None
    """The SQLite inbox's file; default: <data_dir>/inbox.db. A file holding other tables
    is refused, untouched."""
    synchronous: Literal["full", "normal"] = "full"
    """SQLite: with `full` a commit survives power loss; with `normal` it survives a
    process crash only, for fewer fsyncs."""
    rejected_body_bytes: int = Field(64 * 1024, ge=0)
    """How much of a rejected body is kept for inspection."""
    rejected_bytes_per_hour: int = Field(64 * 1024 * 1024, ge=0)
    """Refused callbacks kept per hour, in bytes (bodies and a fixed cost per row); past
    it they are counted by reason, not kept (a queue's message stays in its queue, to be
    kept once there is room)."""
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Below this much free space in data_dir the receiver reports itself not ready."""


class DispatchConfig(Section):
    """`[dispatch]`: how handler runs are claimed, leased and drained."""

    poll_interval: float = Field(1.0, gt=0)
    """Longest wait before looking for retries that came due."""
    drain_timeout: float = Field(10.0, ge=0)
    """Seconds running handler attempts get to finish on shutdown before being cancelled."""
    lease_grace: float = Field(15.0, ge=0)
    """Seconds a run stays leased past its handler's `timeout`, on SQLite and PostgreSQL
    alike: room to record the attempt's outcome (behind another process's write lock on
    SQLite, which waits up to 10 s for it; through a slow pool or a failover on
    PostgreSQL) before another process may take the run and attempt it again."""
    unready_on_handler_error: bool = False
    """Whether a handler that has not started (or cannot) makes /readyz answer 503; a
    handler's own `required` overrides this. Callbacks are kept either way."""


class AdminConfig(Listener):
    """`[admin]`: the listener for /metrics, the detailed /readyz, and (with `inspector`)
    the JSON admin API and the inspector pages, apart from the public port CI posts to."""

    enabled: bool = True
    """`false`: no admin listener."""
    host: str = "127.0.0.1"
    """Where the admin listener binds; a host that is not a loopback address needs
    `token` or `basic_auth`."""
    port: int = Field(8081, ge=0, le=65535)
    """The admin listener's port."""
    inspector: bool = False
    """The JSON admin API (/api) and the inspector pages (/inspector): off unless asked
    for, as they show what callbacks carry and can replay them."""
    token: SecretStr | None = None
    """A bearer token (Authorization: Bearer <token>); it or `basic_auth` may be left out
    on a loopback host. These may do everything (replay too)."""
    basic_auth: dict[str, SecretStr] = {}
    """Basic credentials, `{user = "password"}`, that may do everything (replay too); what
    a browser sends, so give people these."""
    read_token: SecretStr | None = None
    """A bearer token that may only look (every GET), never replay."""
    read_basic_auth: dict[str, SecretStr] = {}
    """Basic credentials that may only look (every GET), never replay."""
    public_url: str | None = None
    """This listener's base URL as people reach it (https://ci.example.com, behind a
    proxy): with `inspector`, handlers link to its pages (a digest to its events)."""

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
            raise ValueError("must be an http:// or https:// URL without a query")
        return url.rstrip("/") if url else url

    @property
    def inspector_url(self) -> str | None:
        """The inspector's public base URL, when there is one to link to."""
        return f"{self.public_url}/inspector" if self.inspector and self.public_url else None

    @field_validator("basic_auth", "read_basic_auth")
    @classmethod
    def _basic_auth_usable(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _usable_users(users)

    @field_validator("token", "read_token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value():
            raise ValueError("the token is empty (leave the key out for none)")
        return token

    @property
    def credentials(self) -> bool:
        return bool(self.token or self.basic_auth or self.read_token or self.read_basic_auth)

    @model_validator(mode="after")
    def _authenticated_unless_loopback(self) -> AdminConfig:
        if self.enabled and not self.credentials and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set admin.token or admin.basic_auth"
            )
        return self


def _usable_users(users: dict[str, SecretStr]) -> dict[str, SecretStr]:
    """HTTP Basic users: a name without ':' and a password that is not empty."""
    for name, password in users.items():
        if not name or ":" in name:
            raise ValueError(f"user {name!r}: a user name is not empty and has no ':'")
        if not password.get_secret_value():
            raise ValueError(f"user {name!r}: the password is empty")
    return users


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LogConfig(Section):
    """`[log]`: structlog lines on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """The lowest level written."""
    format: Literal["auto", "json", "console"] = "auto"
    """`auto`: console on a terminal, JSON lines otherwise."""
    timezone: str = "UTC"
    """The zone of the log's timestamps and of the times the CLI shows: an IANA name
    (Asia/Shanghai) or UTC."""

    _check_timezone = field_validator("timezone")(check_timezone)


class OtelConfig(Section):
    """`[otel]`: OpenTelemetry traces of each callback, from its receipt to every handler
    attempt (needs the `otel` extra). Where they go, the service's name, the sampler and
    the resource's attributes are the standard `OTEL_*` variables'
    (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES, ...)."""

    enabled: bool = False
    """Traces on; with the `otel` extra missing, the service says so in one line and runs
    without them. Off, nothing of OpenTelemetry is imported."""
    trust_traceparent: bool = False
    """Whether a `traceparent` that a callback arrives with (CI, or a proxy in front) is
    its trace's parent. Off, it is linked instead: the public port lets anyone send one."""
    trace_url: str | None = None
    """A trace viewer's page of one trace, `{trace_id}` standing for its id
    (https://grafana.example.com/explore?...{trace_id}): the inspector links each event's."""

    @field_validator("trace_url")
    @classmethod
    def _trace_url_names_the_trace(cls, url: str | None) -> str | None:
        if url is not None and (
            not re.match(r"https?://[^\s/?#]+", url) or "{trace_id}" not in url
        ):
            raise ValueError("must be an http:// or https:// URL with {trace_id} in it")
        return url

    def link(self, trace_id: str) -> str | None:
        """The trace viewer's page of this trace, when one is configured."""
        return self.trace_url.replace("{trace_id}", trace_id) if self.trace_url else None


class PulsarConnection(Section):
    """How to reach a TDMQ for Pulsar (or Apache Pulsar) cluster: `[tdmq]`, and the
    `pulsar` handler's options."""

    service_url: str | None = Field(None, pattern=PULSAR_SERVICE_URL)
    """The cluster's access address: pulsar://host:6650, pulsar+ssl://host:6651, or the
    http://... address the TDMQ console shows."""
    token: SecretStr | None = None
    """A TDMQ role token (console: role management); None connects without authentication."""
    operation_timeout: float = Field(30.0, gt=0)
    """Seconds for the client's own operations (connecting, topic lookups, sends)."""
    tls_trust_certs_file: Path | None = None
    """A file of CA certificates the broker's TLS certificate is checked against
    (pulsar+ssl:// or https://); unset: the client library's default."""
    tls_allow_insecure_connection: bool = False
    """Accept a broker certificate that does not verify (tests only)."""
    tls_validate_hostname: bool = False
    """Check that the broker's certificate names the host connected to."""
    client_log_level: Literal["debug", "info", "warn", "error", "off"] = "warn"
    """The Pulsar client library's own log lines at this level and above go into the log
    (logger "pulsar"); "off" drops them."""


class TdmqConfig(PulsarConnection):
    """`[tdmq]`: the connection, and what `consume` reads."""

    topics: list[str] = []
    """The topics `consume` reads: full names, persistent://<cluster id>/<namespace>/<topic>;
    or a pattern instead."""
    topic_pattern: str | None = None
    """One regex over a namespace's topics, instead of `topics` (not both)."""
    subscription: str = "ci-receiver"
    """The subscription's name (create it on the topic in the TDMQ console)."""
    subscription_type: Literal["shared", "key_shared", "failover", "exclusive"] = "shared"
    """shared: every consumer process takes a part of the messages (scale out);
    key_shared: the same, but one job's messages always go to the same process;
    failover / exclusive: one process at a time."""
    initial_position: Literal["earliest", "latest"] = "earliest"
    """Where a new subscription starts: earliest also takes what was published before."""
    receiver_queue_size: int = Field(100, ge=1)
    """Messages the client fetches ahead; with `concurrency`, the bound on what this process
    holds in memory."""
    concurrency: int = Field(32, ge=1)
    """Messages being ingested at once; with `receiver_queue_size`, the bound on what this
    process holds in memory."""
    nack_delay: float = Field(5.0, gt=0)
    """Seconds before a message whose commit failed is delivered again."""
    dead_letter_topic: str | None = None
    """Messages that cannot be decoded are kept in the inbox as rejected and acked; when
    this is set they are also published here (raw body, with the reason in properties)."""
    verify: Verify = "none"
    """`ci-api`: each event of a message from these topics (your own bridge) waits for CI's
    job API to confirm it before any handler runs."""

    @model_validator(mode="after")
    def _topics_or_pattern(self) -> TdmqConfig:
        if self.topics and self.topic_pattern:
            raise ValueError("set topics or topic_pattern, not both")
        return self

    def missing_for_consumer(self) -> list[str]:
        """The keys `consume` needs that are not set."""
        missing = [] if self.service_url else ["tdmq.service_url"]
        if not (self.topics or self.topic_pattern):
            missing.append("tdmq.topics (or tdmq.topic_pattern)")
        return missing


class CmqConfig(Section):
    """`[cmq]`: TDMQ for CMQ queues, where CI delivers with `CallBackType=TDMQ` and
    `MqMode=Queue`; what `consume` (and `run`) pull from."""

    region: str | None = None
    """CallBackMqConfig.MqRegion (sh, bj, gz, cd, hk, ...): the endpoint is made from it
    and `network`, unless `endpoint` is set."""
    network: Literal["public", "vpc"] = "public"
    """`public`: https://cmq-<region>.public.tencenttdmq.com; `vpc` (from a CVM in the
    region): http://<region>.mqadapter.cmq.tencentyun.com."""
    endpoint: str | None = None
    """The console's API request address (队列服务 > API 请求地址), e.g.
    https://cmq-gz.public.tencenttdmq.com: scheme, host and port only; overrides `region`
    and `network`."""
    secret_id: SecretStr | None = None
    """The SecretId of a CAM key allowed to receive and delete on the queues."""
    secret_key: SecretStr | None = None
    """The SecretKey of that CAM key."""
    token: SecretStr | None = None
    """The session token of a temporary key (STS), sent with `secret_id` and `secret_key`."""
    signature_method: Literal["HmacSHA256", "HmacSHA1"] = "HmacSHA256"
    """How requests are signed (CMQ API 2.0 signature)."""
    queues: list[str] = []
    """CallBackMqConfig.MqName of every queue CI delivers to."""
    polling_wait: int = Field(10, ge=0, le=30)
    """Seconds a receive waits for a message (long polling, 0-30)."""
    batch: int = Field(16, ge=1, le=16)
    """Messages taken per receive (1-16; 1 uses ReceiveMessage/DeleteMessage); with
    `concurrency`, the bound on messages held: batch x concurrency per queue."""
    concurrency: int = Field(2, ge=1)
    """Receives (batches) in hand at once per queue."""
    request_timeout: float = Field(10.0, gt=0)
    """Seconds for an answer beyond `polling_wait`."""
    verify: Verify = "none"
    """`ci-api`: each event of a queue's message waits for CI's job API to confirm it before
    any handler runs."""

    @field_validator("region")
    @classmethod
    def _region_code(cls, region: str | None) -> str | None:
        if region is not None and not re.fullmatch(r"[a-z]+", region):
            raise ValueError(f"{region!r} is not a CMQ region code (sh, bj, gz, cd, hk, ...)")
        return region

    @field_validator("endpoint")
    @classmethod
    def _endpoint_address(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not re.fullmatch(r"https?://[^/?#\s]+/?", endpoint):
            raise ValueError(
                "give the console's API request address, scheme, host and port only"
                " (https://cmq-gz.public.tencenttdmq.com); the path is CMQ's own"
            )
        return endpoint

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, queues: list[str]) -> list[str]:
        for name in queues:
            # CMQ: up to 64 characters, a letter first, then letters, digits, - and _.
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", name):
                raise ValueError(f"{name!r} is not a CMQ queue name")
        if len(set(queues)) != len(queues):
            raise ValueError("a queue is named twice")
        return queues

    @property
    def url(self) -> str | None:
        """Where the data API is: `endpoint`, or the documented address of `region`."""
        if self.endpoint:
            return self.endpoint.rstrip("/")
        if self.region is None:
            return None
        if self.network == "vpc":
            return f"http://{self.region}.mqadapter.cmq.tencentyun.com"
        return f"https://cmq-{self.region}.public.tencenttdmq.com"

    @property
    def configured(self) -> bool:
        """Whether anything of `[cmq]` is set: then `consume` runs it."""
        return bool(self.queues or self.endpoint or self.region)

    def missing_for_consumer(self) -> list[str]:
        """The keys `consume` needs that are not set."""
        needed = {
            "cmq.region (or cmq.endpoint)": self.url,
            "cmq.secret_id": self.secret_id,
            "cmq.secret_key": self.secret_key,
            "cmq.queues": self.queues,
        }
        return [key for key, value in needed.items() if not value]


class RelayConfig(Section):
    """`[relay]`: with a topic, `serve` publishes each accepted callback there (over the
    `[tdmq]` connection) instead of storing it; `consume` processes do the rest."""

    topic: str | None = None
    """The topic `serve` publishes each callback to; unset: no relay, `serve` stores."""
    send_timeout: float = Field(10.0, gt=0)
    """Seconds to wait for the broker to confirm a callback before answering 503."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | float) -> float:
    """Seconds from a number or a string such as `90`, `90s`, `5m`, `24h`, `7d`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration (seconds, or a number with s, m, h or d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# Seconds, written as a number or as `90s`, `5m`, `24h`, `7d`.
Duration = Annotated[float, BeforeValidator(parse_duration)]


def parse_moment(value: str) -> datetime:
    """A time, as `--since` and the admin API take it: ISO 8601 (`2026-11-30T08:00:00+08:00`;
    UTC when it names no zone), or a duration back from now (`90m`, `24h`, `7d`). A
    ValueError says what is wrong."""
    try:
        return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    except OverflowError:
        raise ValueError(f"{value!r} goes back further than a calendar can") from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a time (ISO 8601) nor a duration (24h)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class CiBucket(Section):
    """`[[ci.buckets]]`: one bucket bound to CI, and what of it to watch."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*-[0-9]+$")
    """With its APPID, as CI names it: `media-1250000000`."""
    region: str = Field(pattern=r"^[a-z]+(-[a-z0-9]+)+$")
    """The bucket's region, as the cloud API writes it: `ap-guangzhou`."""
    tags: list[str] = []
    """The job tags watched (Transcode, Snapshot, SmartCover, ...): the job list API takes
    one tag per call."""
    queue_ids: list[str] = []
    """Only jobs of these queues; empty: every queue."""
    workflows: list[str] = []
    """Workflow ids whose executions are watched."""
    workflow_jobs: bool = False
    """Whether the tags' watches recover jobs a workflow started too. CI sends their
    TaskFinish only when the workflow's notify asks for it, so by default they are left
    to the workflow's own watch (its WorkflowFinish holds every task)."""

    @model_validator(mode="after")
    def _something_to_watch(self) -> CiBucket:
        if not (self.tags or self.workflows):
            raise ValueError(
                "name the job tags (the job list API needs one per call) or the workflows to watch"
            )
        return self


class CiConfig(Section):
    """`[ci]`: credentials for CI's job query API, and what the reconciler watches."""

    secret_id: SecretStr | None = None
    """The SecretId of a key allowed the read-only job and workflow queries."""
    secret_key: SecretStr | None = None
    """The SecretKey of that key."""
    token: SecretStr | None = None
    """The session token of temporary credentials (STS), sent with secret_id and secret_key."""
    buckets: list[CiBucket] = []
    """The buckets bound to CI whose jobs are reconciled (and whose callbacks may be
    verified)."""
    endpoint: str | None = Field(None, pattern=r"^https?://[^/?#\s]+/?$")
    """Where the API requests go instead of https://<bucket>.ci.<region>.myqcloud.com:
    scheme://host[:port] (a private gateway or proxy; tests). The Host header still names
    the bucket's CI domain."""
    interval: Duration = Field(300.0, gt=0)
    """Seconds between reconcile passes."""
    window: Duration = Field(86400.0, gt=0)
    """How far back each pass looks."""
    settle: Duration = Field(120.0, ge=0)
    """How long after a job ended its callback may still be on its way: a pass leaves a
    job that ended more recently to a later one, so what it recovers never came."""
    request_timeout: float = Field(10.0, gt=0)
    """Seconds for one API request."""
    max_attempts: int = Field(5, ge=1)
    """Attempts for one API request that is throttled or fails (5xx, network errors)."""
    verify_lag: Duration = Field(60.0, ge=0)
    """Verification: how long after a callback CI's API may still show its job unfinished
    (CI's own lag) before the callback counts as forged."""
    verify_uncovered: Literal["hold", "pass"] = "hold"
    """Verification: what becomes of events the API cannot confirm (kinds no query covers;
    docs: Reconcile and verify): held until replayed by name, or passed as is."""

    @model_validator(mode="after")
    def _credentials_to_watch(self) -> CiConfig:
        if self.buckets and not (self.secret_id and self.secret_key):
            raise ValueError("set secret_id and secret_key to watch buckets")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.buckets)


class RetentionConfig(Section):
    """`[retention]`: how long what is finished stays in the inbox; 0 keeps it for ever.

    Pending, held and dead-lettered work is never removed, whatever its age."""

    events: Duration = Field(30 * 86400.0, ge=0)
    """Handled events (every run done, or none routed), with their runs, attempts and
    receipts, and duplicate deliveries' receipts."""
    bodies: Duration = Field(7 * 86400.0, ge=0)
    """The bodies of handled callbacks: their events stay, without the decoded document."""
    refused: Duration = Field(3 * 86400.0, ge=0)
    """Refused callbacks."""
    interval: Duration = Field(3600.0, gt=0)
    """How often the background pruning runs."""


# A `log` handler writes a line and holds nothing outside: its attempts at once need no
# bound to spare a service, and 8 (each claim taking no more than its free places) let
# dispatch fall far behind a busy receiver (docs: Benchmarks, HTTP).
DEFAULT_LOG_CONCURRENCY = 64


class HandlerConfig(BaseModel):
    """`[handlers.NAME]`: the generic keys below; every other key is the handler's own."""

    model_config = ConfigDict(**TABLE, extra="allow")

    type: str
    """The handler: a built-in type (`log`, `jsonl`, `sql`, `webhook`, `wecom`, ...), one an
    installed package registers (the `ci_receiver.handlers` entry points), or
    `module:attribute` on PYTHONPATH."""
    timeout: float = Field(30.0, gt=0)
    """Seconds per attempt."""
    max_attempts: int = Field(10, ge=1)
    """Attempts before the run is dead-lettered."""
    backoff_initial: float = Field(1.0, ge=0)
    """Seconds before the first retry; the delay doubles per attempt, with jitter."""
    backoff_max: float = Field(600.0, ge=0)
    """The longest delay between attempts, in seconds."""
    concurrency: int = Field(8, ge=1)
    """Attempts of this handler at once (`log`: 64 unless set)."""
    batch_size: int = Field(100, ge=1)
    """A handler that takes batches (handle_batch): at most this many events in one.
    `concurrency` counts batches. Ignored by a handler that takes events one by one."""
    batch_wait: float = Field(0.2, ge=0)
    """A handler that takes batches: seconds to wait for more events once the first is due
    (the batch is leased meanwhile)."""
    rate: str | list[str] | None = None
    """At most this many attempts started in any such window, by all processes together:
    "20/min", or a list ["100/min", "5/s"]; "off": none, not even the type's default
    (the robots ship their vendor's documented limit). receiver/rates.py."""
    required: bool | None = None
    """Whether this handler not running makes /readyz answer 503; unset: as
    [dispatch] unready_on_handler_error says."""

    @model_validator(mode="after")
    def _log_needs_no_bound(self) -> HandlerConfig:
        if self.type == "log" and "concurrency" not in self.model_fields_set:
            # Into __dict__: the type's default, not a key the config set (check-config).
            self.__dict__["concurrency"] = DEFAULT_LOG_CONCURRENCY
        return self

    @field_validator("rate")
    @classmethod
    def _rate_reads(cls, rate: str | list[str] | None) -> str | list[str] | None:
        rates.limits(rate, [])  # raises ValueError naming what is wrong
        return rate

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


StrOrList = str | list[str] | None


class RouteMatch(Section):
    """Every key given must match; a list matches any of its values; `key` and
    `user_data` are glob patterns (`videos/*.mp4`). `kind`, `state` and `verdict` take
    only what CI can send, in any case; `event_name`, `tag` and `label` match without
    regard to case, and `tag` is an event name for an event without a Tag (a workflow's,
    a moderation verdict's). receiver/callback/matching.py holds these rules."""

    kind: StrOrList = None
    """`job`, `workflow` or `moderation`."""
    event_name: StrOrList = None
    """CI's `EventName`: `TaskFinish`, `WorkflowFinish`, `ReviewVideo`, ..."""
    tag: StrOrList = None
    """The job's `Tag`: `SmartCover`, `Transcode`, ... (one CI is not known to send is a
    warning)."""
    state: StrOrList = None
    """`Submitted`, `Running`, `Success`, `Failed`, `Pause` or `Cancel`."""
    verdict: StrOrList = None
    """Moderation events: `violation`, `suspected` or `normal` (Moderation.result 1, 2, 0)."""
    label: StrOrList = None
    """Moderation events: CI's label (`Porn`, `Ads`, ...)."""
    bucket: StrOrList = None
    """The input object's bucket."""
    region: StrOrList = None
    """The input object's region."""
    key: StrOrList = None
    """A glob on the input object's key (`videos/*.mp4`)."""
    user_data: StrOrList = None
    """A glob on the job's `UserData`."""

    @field_validator("kind", "state", "verdict")
    @classmethod
    def _one_of_the_known(cls, value: StrOrList, info: ValidationInfo) -> StrOrList:
        if value is None:
            return None
        spelled = FIELDS[info.field_name or ""].spelled(
            [value] if isinstance(value, str) else value
        )
        return spelled[0] if isinstance(value, str) else spelled


class RouteConfig(Section):
    """`[[routes]]`: which events go to which handlers. Several routes may match one event;
    each handler runs once per event."""

    match: RouteMatch = RouteMatch()
    """The event's fields to match; empty: every event."""
    handlers: list[str] = Field(min_length=1)
    """The configured handlers to run on the events it matches."""


def _default_handlers() -> dict[str, HandlerConfig]:
    return {"log": HandlerConfig(type="log")}


class Config(BaseModel):
    model_config = ConfigDict(**TABLE, extra="forbid", validate_default=True)

    data_dir: Path = Path("ci-receiver-data")
    """The folder the SQLite inbox lives in (and whose free space is watched)."""
    http: HttpConfig = HttpConfig()
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    inbox: InboxConfig = InboxConfig()
    dispatch: DispatchConfig = DispatchConfig()
    log: LogConfig = LogConfig()
    otel: OtelConfig = OtelConfig()
    tdmq: TdmqConfig = TdmqConfig()
    cmq: CmqConfig = CmqConfig()
    relay: RelayConfig = RelayConfig()
    ci: CiConfig = CiConfig()
    retention: RetentionConfig = RetentionConfig()
    handlers: dict[str, HandlerConfig] = Field(default_factory=_default_handlers)
    """The handlers, by a name of your choosing (the routes name them)."""
    routes: list[RouteConfig] | None = None
    """Which handlers each event goes to; unset: every handler gets every event."""

    # Where it was read from, and the `${NAME}` references left unresolved (load_config).
    _file: str | None = PrivateAttr(None)
    _unset: tuple[envvars.Unset, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _routes_name_known_handlers(self) -> Config:
        for index, route in enumerate(self.routes or ()):
            for name in route.handlers:
                if name not in self.handlers:
                    raise ValueError(
                        f"{envvars.dotted(('routes', index))} names handler {name!r}, which is"
                        f" not configured{did_you_mean(name, self.handlers)}; configured:"
                        f" {', '.join(sorted(self.handlers)) or 'none'}"
                    )
        return self

    @model_validator(mode="after")
    def _verification_has_credentials(self) -> Config:
        if VERIFY_RUN in self.handlers:
            raise ValueError(f"handlers: {VERIFY_RUN!r} is the verification step's name")
        verifying = [name for name in VERIFYING_SECTIONS if getattr(self, name).verify != "none"]
        if verifying and not self.ci.enabled:
            raise ValueError(
                f'{verifying[0]}.verify = "ci-api" needs [ci] secret_id, secret_key and the'
                " buckets whose callbacks are verified ([[ci.buckets]])"
            )
        return self

    @model_validator(mode="after")
    def _reconcile_within_retention(self) -> Config:
        kept = self.retention.events
        if self.ci.enabled and kept and self.ci.window >= kept:
            raise ValueError(
                f"ci.window ({self.ci.window:g} s) reaches back as far as retention.events"
                f" keeps handled events ({kept:g} s): the reconciler would recover events"
                " retention pruned and run their handlers again; make the window shorter"
            )
        return self

    def refusals_wait_in(self) -> frozenset[str]:
        """The sources whose refused message, when the budget for refused bodies has no
        room for it, stays in its queue to be kept once it has: CMQ's (deleted only once
        kept), and TDMQ's unless a dead-letter topic takes it. (A relayed HTTP callback's
        sender had its answer already: it is counted, as over HTTP.)"""
        return frozenset({"cmq"} if self.tdmq.dead_letter_topic else {"cmq", "tdmq"})

    def verified_sources(self) -> frozenset[str]:
        """The event sources whose events wait for verification."""
        return frozenset(
            source
            for name, sources in VERIFYING_SECTIONS.items()
            if getattr(self, name).verify != "none"
            for source in sources
        )

    @property
    def unset(self) -> tuple[envvars.Unset, ...]:
        """The `${NAME}` references to unset variables that were not needed, each read as
        `envvars.placeholder(NAME)`: a config loaded for a command that does not use them."""
        return self._unset

    def located(self, message: str) -> str:
        """An error about this config, prefixed with the file it was read from."""
        return f"{self._file}: {message}" if self._file else message

    @property
    def inbox_path(self) -> Path:
        return self.inbox.path or self.data_dir / "inbox.db"

    def effective(self) -> dict[str, Any]:
        """The configuration as it will be used, secrets masked: what check-config prints."""
        data = self.model_dump(mode="json")
        if self.inbox.url is None:
            data["inbox"]["path"] = str(self.inbox_path)
        else:
            data["inbox"]["url"] = mask_url(self.inbox.url)
        data["handlers"] = {
            name: _mask({**handler.model_dump(mode="json"), "required": self.required(name)})
            for name, handler in self.handlers.items()
        }
        masked: dict[str, Any] = mask_credentials(data)
        return masked

    def required(self, handler: str) -> bool:
        """Whether this handler not running makes the receiver unready. One not in the
        config (the receiver's own verification step, or a handler a reload is taking
        out) never does."""
        if handler not in self.handlers:
            return False
        own = self.handlers[handler].required
        return self.dispatch.unready_on_handler_error if own is None else own


def load_config(path: str | Path | None = None, *, needs: Collection[str] | None = None) -> Config:
    """Read the TOML file (or `$CI_RECEIVER_CONFIG`, or none) and the environment.

    `needs`: the top-level keys (`inbox`, `data_dir`) whose values the caller uses. Only
    the `${NAME}` references under them must be set: one elsewhere reads as a placeholder
    (`Config.unset` lists them), so that looking at the inbox takes none of the secrets
    serving does. None: every reference must be set."""
    path = path or os.environ.get(CONFIG_ENV)
    where = f"{path}: " if path else ""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
        except OSError as exc:  # a folder, no permission to read it
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        data, unset = envvars.expand_references(
            data, os.environ, lambda key: needs is None or key[0] in needs
        )
        overrides, sources = envvars.overrides(Config, os.environ)
    except envvars.EnvironmentProblem as exc:
        raise ConfigError(where + str(exc)) from None
    merged = envvars.merge(data, overrides)
    while True:
        try:
            config = Config.model_validate(merged)
            break
        except ValidationError as exc:
            # A placeholder the key does not take (`service_url = "${PULSAR_URL}"`): as
            # the variable is not needed, the key is left unset rather than refused.
            if not _drop_refused_placeholders(merged, exc, unset):
                raise ConfigError(where + _describe(exc, sources)) from None
    config._file = str(path) if path else None
    config._unset = tuple(unset)
    return config


def _drop_refused_placeholders(
    data: dict[str, Any], error: ValidationError, unset: list[envvars.Unset]
) -> bool:
    """Remove from `data` every key holding a placeholder that validation refused (the
    whole list, for an item of one); whether there was any. A key that an environment
    variable set since holds what that variable says, which stays refused."""
    refused = [tuple(item["loc"]) for item in error.errors() if item["loc"]]
    dropped = False
    for reference in unset:
        value = _at(data, reference.key)
        if not (isinstance(value, str) and envvars.placeholder(reference.variable) in value):
            continue
        if any(_overlap(reference.key, location) for location in refused):
            key = reference.key
            first_item = next((i for i, part in enumerate(key) if isinstance(part, int)), None)
            dropped |= _remove(data, key[:first_item])
    return dropped


def _overlap(a: tuple[str | int, ...], b: tuple[str | int, ...]) -> bool:
    return a[: len(b)] == b or b[: len(a)] == a


def _at(data: Any, key: tuple[str | int, ...]) -> Any:
    """The value at `key` in nested tables and lists; None where there is none."""
    for part in key:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _remove(data: dict[str, Any], key: tuple[str | int, ...]) -> bool:
    table = _at(data, key[:-1])
    if isinstance(table, dict) and key and key[-1] in table:
        del table[key[-1]]
        return True
    return False


def _describe(error: ValidationError, sources: Mapping[tuple[str | int, ...], str]) -> str:
    lines = []
    for item in error.errors():
        location = envvars.dotted(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(item["loc"][-1]), _known_keys(item["loc"]))
        variable = envvars.source_of(item["loc"], sources)
        if variable is not None:
            message += f" (from the environment variable {variable})"
        # An error of the whole config (a route naming no handler) names its key itself.
        lines.append(f"{location}: {message}" if location else message)
    return "; ".join(lines)


def _known_keys(location: tuple[str | int, ...]) -> list[str]:
    """The keys the table holding `location` takes (none known: a table of free keys)."""
    holder = envvars.annotation_at(Config, location[:-1])
    return [key for option in envvars.alternatives(holder) if _is_table(option)
            for key in option.model_fields]  # fmt: skip


def _is_table(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _mask(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("**********" if SECRET_NAME.search(k) and v not in (None, "") else v)
        for k, v in options.items()
    }
