"""Configuration: one TOML file, every key overridable by a `CI_RECEIVER_*` variable.

`CI_RECEIVER_HTTP__PORT=9000` overrides `[http] port` (double underscore between
levels); `${NAME}` inside a TOML string is replaced by the environment variable NAME.
With no file at all the embedded default applies: SQLite inbox in `./ci-receiver-data`,
the `log` handler on every event, port 8080.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from receiver.inbox import VERIFY_RUN
from receiver.payload import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "CI_RECEIVER_CONFIG"
ENV_PREFIX = "CI_RECEIVER_"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
# What the Pulsar client takes as a service URL ([tdmq] and the pulsar handler alike):
# the binary protocol, or HTTP lookup (the address the TDMQ console shows is http://).
PULSAR_SERVICE_URL = r"^(pulsar(\+ssl)?|https?)://"
# Option names whose values are masked when the effective config is printed.
_SECRET_NAME = re.compile(r"secret|token|password|passwd|api_?key|credential", re.IGNORECASE)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key or variable."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# `verify` of a source: "ci-api" holds each of its events from handlers until CI's job
# query API confirms it ([ci] credentials needed; see receiver/verify.py).
Verify = Literal["none", "ci-api"]


# The sections with a `verify` key, and the event sources each one's events come as: a
# CMQ topic's push arrives over HTTP.
VERIFYING_SECTIONS = {"http": ("http", "cmq-push"), "tdmq": ("tdmq",)}


class HttpConfig(Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    # When set, callbacks are only accepted on /callbacks/<one of these>.
    tokens: list[SecretStr] = []

    @field_validator("tokens")
    @classmethod
    def _tokens_fit_in_a_url(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for index, token in enumerate(tokens):
            if not _URL_SAFE.fullmatch(token.get_secret_value()):
                raise ValueError(
                    f"token {index} must be letters, digits, '-', '_', '.' or '~' (it is a path"
                    " segment), and not empty"
                )
        return tokens

    access_log: bool = True
    # Seconds to let in-flight requests finish after SIGTERM.
    graceful_timeout: float = Field(10.0, gt=0)
    verify: Verify = "none"


class LimitsConfig(Section):
    max_bytes: int = Field(Limits.__dataclass_fields__["max_bytes"].default, gt=0)
    # At most 200: a deeper document could not be written out as JSON again (orjson stops
    # at 254 levels, and the Event nests the document two levels down).
    max_depth: int = Field(Limits.__dataclass_fields__["max_depth"].default, gt=0, le=200)
    max_elements: int = Field(Limits.__dataclass_fields__["max_elements"].default, gt=0)
    max_events: int = Field(Limits.__dataclass_fields__["max_events"].default, gt=0)

    def to_limits(self) -> Limits:
        return Limits(**self.model_dump())


class InboxConfig(Section):
    """`[inbox]`: the SQLite file (the default), or a PostgreSQL database that any number
    of receivers and consumers share."""

    # postgresql://user:password@host:5432/db (password URL-encoded; `${PW}` reads it from
    # the environment). Unset: the SQLite file at `path`.
    url: str | None = Field(None, pattern=r"^postgres(ql)?://")
    # The PostgreSQL schema holding the inbox's tables (created when missing), so that they
    # never meet the tables of a `sql` handler on the same database.
    postgres_schema: str = Field("ci_receiver", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Connections each process keeps to PostgreSQL.
    pool_size: int = Field(10, ge=2, le=1000)
    # Default: <data_dir>/inbox.db
    path: Path | None = None
    # "full": a commit survives power loss; "normal": survives a process crash only.
    synchronous: Literal["full", "normal"] = "full"
    # How much of a rejected body is kept for inspection.
    rejected_body_bytes: int = Field(64 * 1024, ge=0)


class DispatchConfig(Section):
    # Longest wait before looking for retries that came due.
    poll_interval: float = Field(1.0, gt=0)
    # Seconds running handler attempts get to finish on shutdown before being cancelled.
    drain_timeout: float = Field(10.0, ge=0)


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: console on a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class PulsarConnection(Section):
    """How to reach a TDMQ for Pulsar (or Apache Pulsar) cluster: `[tdmq]`, and the
    `pulsar` handler's options."""

    # The cluster's access address: pulsar://host:6650, pulsar+ssl://host:6651, or the
    # http://... address the TDMQ console shows.
    service_url: str | None = Field(None, pattern=PULSAR_SERVICE_URL)
    # A TDMQ role token (console: role management); None connects without authentication.
    token: SecretStr | None = None
    # Seconds for the client's own operations (connecting, topic lookups, sends).
    operation_timeout: float = Field(30.0, gt=0)
    tls_trust_certs_file: Path | None = None
    tls_allow_insecure_connection: bool = False
    tls_validate_hostname: bool = False
    # The Pulsar client library logs on its own to stdout, at this level and above.
    client_log_level: Literal["debug", "info", "warn", "error"] = "warn"


class TdmqConfig(PulsarConnection):
    """`[tdmq]`: the connection, and what `consume` reads."""

    # Full names, persistent://<cluster id>/<namespace>/<topic>; or a pattern instead.
    topics: list[str] = []
    topic_pattern: str | None = None
    subscription: str = "ci-receiver"
    # shared: every consumer process takes a part of the messages (scale out);
    # key_shared: the same, but one job's messages always go to the same process;
    # failover / exclusive: one process at a time.
    subscription_type: Literal["shared", "key_shared", "failover", "exclusive"] = "shared"
    # Where a new subscription starts: earliest also takes what was published before.
    initial_position: Literal["earliest", "latest"] = "earliest"
    # Messages the client fetches ahead, and messages ingested at once: together the bound
    # on what this process holds in memory.
    receiver_queue_size: int = Field(100, ge=1)
    concurrency: int = Field(32, ge=1)
    # Seconds before a message whose commit failed is delivered again.
    nack_delay: float = Field(5.0, gt=0)
    # Messages that cannot be decoded are kept in the inbox as rejected and acked; when
    # this is set they are also published here (raw body, with the reason in properties).
    dead_letter_topic: str | None = None
    verify: Verify = "none"

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


class RelayConfig(Section):
    """`[relay]`: with a topic, `serve` publishes each accepted callback there (over the
    `[tdmq]` connection) instead of storing it; `consume` processes do the rest."""

    topic: str | None = None
    # Seconds to wait for the broker to confirm a callback before answering 503.
    send_timeout: float = Field(10.0, gt=0)


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


class CiBucket(Section):
    """`[[ci.buckets]]`: one bucket bound to CI, and what of it to watch."""

    # With its APPID, as CI names it: `media-1250000000`.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*-[0-9]+$")
    region: str = Field(pattern=r"^[a-z]+(-[a-z0-9]+)+$")
    # The job list API takes one tag per call (Transcode, Snapshot, SmartCover, ...).
    tags: list[str] = []
    # Only jobs of these queues; empty: every queue.
    queue_ids: list[str] = []
    # Workflow ids whose executions are watched.
    workflows: list[str] = []

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
    secret_key: SecretStr | None = None
    # The session token of temporary credentials (STS), sent with secret_id and secret_key.
    token: SecretStr | None = None
    buckets: list[CiBucket] = []
    # Where the API requests go instead of https://<bucket>.ci.<region>.myqcloud.com:
    # scheme://host[:port] (a private gateway or proxy; tests). The Host header still names
    # the bucket's CI domain.
    endpoint: str | None = Field(None, pattern=r"^https?://[^/?#\s]+/?$")
    # Seconds between reconcile passes, and how far back each pass looks.
    interval: float = Field(300.0, gt=0)
    window: float = Field(86400.0, gt=0)
    # Seconds for one API request, and attempts for one that is throttled or fails.
    request_timeout: float = Field(10.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    # Verification: how long after a callback CI's API may still show its job unfinished
    # (CI's own lag) before the callback counts as forged; and what becomes of events the
    # API cannot confirm (see the README): held until replayed by name, or passed as is.
    verify_lag: float = Field(60.0, ge=0)
    verify_uncovered: Literal["hold", "pass"] = "hold"

    @field_validator("interval", "window", "verify_lag", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _credentials_to_watch(self) -> CiConfig:
        if self.buckets and not (self.secret_id and self.secret_key):
            raise ValueError("set secret_id and secret_key to watch buckets")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.buckets)


class HandlerConfig(BaseModel):
    """`[handlers.NAME]`: the generic keys below; every other key is the handler's own."""

    model_config = ConfigDict(extra="allow")

    type: str
    timeout: float = Field(30.0, gt=0)
    max_attempts: int = Field(10, ge=1)
    backoff_initial: float = Field(1.0, ge=0)
    backoff_max: float = Field(600.0, ge=0)
    concurrency: int = Field(8, ge=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


StrOrList = str | list[str] | None


class RouteMatch(Section):
    """Every key given must match; a list matches any of its values; `key` and
    `user_data` are glob patterns (`videos/*.mp4`)."""

    kind: StrOrList = None
    event_name: StrOrList = None
    tag: StrOrList = None
    state: StrOrList = None
    bucket: StrOrList = None
    region: StrOrList = None
    key: StrOrList = None
    user_data: StrOrList = None


class RouteConfig(Section):
    match: RouteMatch = RouteMatch()
    handlers: list[str] = Field(min_length=1)


def _default_handlers() -> dict[str, HandlerConfig]:
    return {"log": HandlerConfig(type="log")}


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Path("ci-receiver-data")
    http: HttpConfig = HttpConfig()
    limits: LimitsConfig = LimitsConfig()
    inbox: InboxConfig = InboxConfig()
    dispatch: DispatchConfig = DispatchConfig()
    log: LogConfig = LogConfig()
    tdmq: TdmqConfig = TdmqConfig()
    relay: RelayConfig = RelayConfig()
    ci: CiConfig = CiConfig()
    handlers: dict[str, HandlerConfig] = Field(default_factory=_default_handlers)
    # None: every handler gets every event.
    routes: list[RouteConfig] | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file comes in as init values; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _routes_name_known_handlers(self) -> Config:
        for index, route in enumerate(self.routes or ()):
            for name in route.handlers:
                if name not in self.handlers:
                    raise ValueError(
                        f"routes[{index}] names handler {name!r}, which is not configured"
                        f" (configured: {', '.join(sorted(self.handlers)) or 'none'})"
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

    def verified_sources(self) -> frozenset[str]:
        """The event sources whose events wait for verification."""
        return frozenset(
            source
            for name, sources in VERIFYING_SECTIONS.items()
            if getattr(self, name).verify != "none"
            for source in sources
        )

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
            name: _mask(handler.model_dump(mode="json")) for name, handler in self.handlers.items()
        }
        return data


def load_config(path: str | Path | None = None) -> Config:
    """Read the TOML file (or `$CI_RECEIVER_CONFIG`, or none) and the environment."""
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _expand_env(data, os.environ, ())
    try:
        return Config(**data)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(where + _describe(exc)) from None


def _expand_env(value: Any, environ: Mapping[str, str], key: tuple[str | int, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, environ, (*key, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, environ, (*key, i)) for i, v in enumerate(value)]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"{_dotted(key)}: environment variable {name} is not set")
            return environ[name]

        return _ENV_REFERENCE.sub(replace, value)
    return value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = _dotted(item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        variable = ENV_PREFIX + "__".join(str(part) for part in item["loc"]).upper()
        if variable in os.environ:
            message += f" (from the environment variable {variable})"
        lines.append(f"{location}: {message}")
    return "; ".join(lines)


def _dotted(key: tuple[Any, ...]) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _mask(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("**********" if _SECRET_NAME.search(k) and v not in (None, "") else v)
        for k, v in options.items()
    }


def mask_url(url: str) -> str:
    """A URL with its password masked, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:**********"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))
