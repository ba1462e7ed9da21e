"""Configuration: one TOML file, every key overridable by a `CI_RECEIVER_*` variable.

`CI_RECEIVER_HTTP__PORT=9000` overrides `[http] port` (double underscore between
levels); `${NAME}` inside a TOML string is replaced by the environment variable NAME.
With no file at all the embedded default applies: SQLite inbox in `./ci-receiver-data`,
the `log` handler on every event, port 8080.
"""

from __future__ import annotations

import ipaddress
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
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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

    # --- who may post (besides tokens) ---
    # HTTP Basic credentials: {username = "password"}.
    basic_auth: dict[str, SecretStr] = {}
    # Only these addresses (CIDRs) may post; empty: any address.
    allow_from: list[IPvAnyNetwork] = []
    # X-Forwarded-For is read only from these (the load balancer in front).
    trusted_proxies: list[IPvAnyNetwork] = []
    # Failed authentications per address (IPv6: per /64) and minute before 429; 0: no limit.
    auth_failures_per_minute: int = Field(30, ge=0)

    # --- bounds on every request ---
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_headers: int = Field(100, ge=10)
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(30.0, gt=0)
    keepalive_timeout: float = Field(5.0, gt=0)
    # Open connections, and requests being handled, beyond which new ones get 503.
    max_connections: int = Field(1000, ge=1)
    max_requests: int = Field(128, ge=1)
    # Of those, requests with bodies over 64 KiB (what holds the most memory).
    max_large_requests: int = Field(8, ge=1)

    @field_validator("basic_auth")
    @classmethod
    def _basic_auth_usable(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _usable_users(users)

    @property
    def authenticated(self) -> bool:
        """Whether anything keeps strangers from posting."""
        return bool(self.tokens or self.basic_auth or self.allow_from)


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
    # Default: <data_dir>/inbox.db
    path: Path | None = None
    # "full": a commit survives power loss; "normal": survives a process crash only.
    synchronous: Literal["full", "normal"] = "full"
    # How much of a rejected body is kept for inspection.
    rejected_body_bytes: int = Field(64 * 1024, ge=0)
    # Refused callbacks kept per hour, in bytes (bodies and a fixed cost per row); past
    # it they are counted by reason, not kept.
    rejected_bytes_per_hour: int = Field(64 * 1024 * 1024, ge=0)
    # Below this much free space in data_dir the receiver reports itself not ready.
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)


class DispatchConfig(Section):
    # Longest wait before looking for retries that came due.
    poll_interval: float = Field(1.0, gt=0)
    # Seconds running handler attempts get to finish on shutdown before being cancelled.
    drain_timeout: float = Field(10.0, ge=0)


class AdminConfig(Section):
    """`[admin]`: the listener for /metrics, the detailed /readyz (and the admin API to
    come), apart from the public port CI posts to."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    # Either a bearer token (Authorization: Bearer <token>) or Basic credentials; on a
    # loopback host both may be left out.
    token: SecretStr | None = None
    basic_auth: dict[str, SecretStr] = {}

    @field_validator("basic_auth")
    @classmethod
    def _basic_auth_usable(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _usable_users(users)

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value():
            raise ValueError("the token is empty (leave the key out for none)")
        return token

    @model_validator(mode="after")
    def _authenticated_unless_loopback(self) -> AdminConfig:
        if self.enabled and not (self.token or self.basic_auth) and not _is_loopback(self.host):
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
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    inbox: InboxConfig = InboxConfig()
    dispatch: DispatchConfig = DispatchConfig()
    log: LogConfig = LogConfig()
    tdmq: TdmqConfig = TdmqConfig()
    relay: RelayConfig = RelayConfig()
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

    @property
    def inbox_path(self) -> Path:
        return self.inbox.path or self.data_dir / "inbox.db"

    def effective(self) -> dict[str, Any]:
        """The configuration as it will be used, secrets masked: what check-config prints."""
        data = self.model_dump(mode="json")
        data["inbox"]["path"] = str(self.inbox_path)
        data["handlers"] = {
            name: _mask(handler.model_dump(mode="json")) for name, handler in self.handlers.items()
        }
        masked: dict[str, Any] = mask_credentials(data)
        return masked


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


def mask_credentials(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them) with every URL's credentials
    masked: the userinfo (a password, or a lone user name, which is often a token) and
    the value of every query parameter."""
    if isinstance(value, dict):
        return {k: mask_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_credentials(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return "**********"  # not readable as a URL: nothing of it can be shown safely
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else f"***@{host}"
    query = "&".join(
        f"{name}=***" if separator else name
        for name, separator, _ in (pair.partition("=") for pair in parts.query.split("&"))
        if name or separator
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
