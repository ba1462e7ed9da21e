"""Everything behind the sources, put together from the config: inbox, router, handlers,
dispatcher and the ingest path that the HTTP app and the TDMQ consumer share."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import handlers as handler_api
from receiver import tracing
from receiver.config import Config
from receiver.dispatch.loop import Dispatcher
from receiver.dispatch.slots import Slot
from receiver.inbox import Inbox
from receiver.inbox.factory import open_inbox
from receiver.ingest.ingest import Ingestor, RejectedBudget
from receiver.ingest.routing import Router
from receiver.masking import Masker, secrets_in
from receiver.metrics import Metrics
from receiver.upkeep.backlog import BacklogMonitor
from receiver.upkeep.presence import Presence
from receiver.upkeep.retention import Pruner

if TYPE_CHECKING:
    from receiver.ci.api import CiApi

# A readiness check: returns (ok, detail).
Check = Callable[[], Awaitable[tuple[bool, str]]]
# How long readiness waits for the inbox to take its probe write: one it has not taken
# by then (the SQLite file locked by another process, a disk that stopped answering) is
# not ready, said at once rather than after every batch queued before it.
INBOX_PROBE_SECONDS = 5.0


def handler_secrets_masker(config: Config, slots: list[Slot]) -> Masker:
    """Masks the handlers' secret options (as configured, and as the handlers validated
    them) and URLs' user info and query."""
    secrets = [secret for handler in config.handlers.values() for secret in secrets_in(handler)]
    secrets += [
        secret for slot in slots for secret in secrets_in(getattr(slot.handler, "options", None))
    ]
    return Masker(secrets)


def build_slots(config: Config) -> list[Slot]:
    """Make every configured handler (validating its options); raises HandlerConfigError."""
    slots = []
    for name, handler_config in config.handlers.items():
        try:
            handler = handler_api.build(handler_config.type, handler_config.options)
        except handler_api.HandlerConfigError as exc:
            raise handler_api.HandlerConfigError(config.located(f"handlers.{name}: {exc}")) from exc
        slots.append(Slot(name, handler, handler_config))
    return slots


def free_space(folder: Path, minimum: int) -> tuple[bool, str]:
    """Whether the file system of `folder` has `minimum` bytes free. A small write (the
    inbox's probe) can still succeed on a full disk, in pages SQLite had already; a
    callback then fails. So readiness also asks the file system."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return False, f"cannot tell the free space of {folder}: {exc.strerror or exc}"
    detail = f"{free // 2**20} MiB free"
    if free < minimum:
        return False, f"{detail}, below inbox.min_free_bytes ({minimum // 2**20} MiB)"
    return True, detail


class Service:
    def __init__(self, config: Config, *, wait: bool = True) -> None:
        """`wait`: a service, whose start waits for an inbox database that cannot be
        reached yet; a command (`replay --receipt`, `reconcile`) fails at once instead."""
        self.config = config
        self.metrics = Metrics()
        self.inbox: Inbox = open_inbox(config, wait=wait, registry=self.metrics.registry)
        # CI's job API, shared by the reconciler and verification, when [ci] is set.
        self.ci_api: CiApi | None = None
        slots = build_slots(config)
        # Slots of the receiver's own (verification), not of `[handlers]`: a reload of
        # the handlers keeps them.
        self._own_slots: list[Slot] = []
        if config.ci.enabled:
            from receiver.ci.api import CiApi

            self.ci_api = CiApi(config.ci, self.metrics.registry)
        if config.verified_sources():
            from receiver.ci.verify import verify_slot

            assert self.ci_api is not None  # the config says so
            self._own_slots.append(
                verify_slot(config.ci, self.ci_api, self.inbox, self.metrics.registry,
                            wake=lambda: self.dispatcher.wake())
            )  # fmt: skip
        slots += self._own_slots
        masker = handler_secrets_masker(config, slots)
        tracing.mask_with(masker)  # the spans' error descriptions, as the log's
        self.dispatcher = Dispatcher(
            self.inbox,
            slots,
            self.metrics,
            poll_interval=config.dispatch.poll_interval,
            drain_timeout=config.dispatch.drain_timeout,
            lease_grace=config.dispatch.lease_grace,
            mask=masker,
            inspector_url=config.admin.inspector_url,
        )
        self.ingestor = Ingestor(
            self.inbox,
            Router(config.routes, list(config.handlers)),
            self.metrics,
            config.limits.to_limits(),
            handoff=self.dispatcher,
            rejected=RejectedBudget(
                config.inbox.rejected_body_bytes, config.inbox.rejected_bytes_per_hour
            ),
            verified_sources=config.verified_sources(),
            refusals_wait_in=config.refusals_wait_in(),
        )
        # Inbox upkeep, running beside the dispatcher for as long as the service does.
        self.pruner = Pruner(self.inbox, config.retention, self.metrics.registry)
        self.monitor = BacklogMonitor(self.inbox, list(config.handlers), self.metrics.registry)
        self.presence = Presence(self.inbox, list(config.handlers))
        self._upkeep_parts = (self.pruner, self.monitor, self.presence)
        self._upkeep: list[asyncio.Task[None]] = []
        self.draining = False
        self._started = False
        self._checks: dict[str, Check] = {}

    async def reload(self, config: Config, slots: list[Slot]) -> list[str]:
        """Take the handlers and routes of `config` (its other sections wait for a
        restart), with `slots` built from them; what changed, as `Dispatcher` says."""
        slots = slots + self._own_slots
        self.config = self.config.model_copy(
            update={"handlers": config.handlers, "routes": config.routes}
        )
        self.ingestor.router = Router(config.routes, list(config.handlers))
        masker = handler_secrets_masker(self.config, slots)
        tracing.mask_with(masker)
        changes = self.dispatcher.replace_handlers(slots, masker)
        self.monitor.handlers = self.presence.handlers = list(config.handlers)
        with contextlib.suppress(Exception):  # else said within the presence interval
            await self.presence.announce()  # so that `replay` knows at once
        return changes

    def add_check(self, name: str, check: Check) -> None:
        """Let a source (the TDMQ consumer) take part in readiness: asked once the service
        has started, since sources start only then."""
        self._checks[name] = check

    async def start(self, waiting: Callable[[], None] | None = None) -> None:
        await self.inbox.open(waiting)
        await self.dispatcher.start()
        self._upkeep = [
            asyncio.create_task(part.run(), name=part.name) for part in self._upkeep_parts
        ]
        self._started = True

    async def stop(self) -> None:
        self.draining = True
        for part in self._upkeep_parts:
            part.stop()
        await asyncio.gather(*self._upkeep, return_exceptions=True)
        await self.dispatcher.stop()
        await self.inbox.close()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, tuple[bool, str]] = {}
        try:
            await asyncio.wait_for(self.inbox.ping(), INBOX_PROBE_SECONDS)
            checks["inbox"] = (True, "writable")
        except TimeoutError:
            checks["inbox"] = (
                False,
                f"not writable: no write taken within {INBOX_PROBE_SECONDS:g} s"
                " (locked by another process, or its storage not answering)",
            )
        except Exception as exc:
            checks["inbox"] = (False, str(exc))
        if self.config.inbox.url is None:  # the inbox is a file on this host's disk
            checks["disk"] = free_space(
                self.config.inbox_path.parent, self.config.inbox.min_free_bytes
            )
        running = self.dispatcher.running
        checks["dispatcher"] = (running, "running" if running else "stopped")
        checks["draining"] = (not self.draining, "draining" if self.draining else "no")
        for name, check in self._checks.items():
            if not self._started:  # its inbox waits for its database: `inbox` says why
                checks[name] = (False, "not started: waiting for the inbox")
                continue
            try:
                checks[name] = await check()
            except Exception as exc:
                checks[name] = (False, str(exc))
        # A handler that has not started shows here with its error (secrets masked). By
        # default it does not make the receiver unready: callbacks are still kept, and its
        # runs wait. A required one does.
        started = self.dispatcher.handler_started()
        for name, status in self.dispatcher.handler_status().items():
            ok = started[name] or not self.config.required(name)
            checks[f"handler:{name}"] = (ok, status)
        details = {name: detail for name, (_, detail) in checks.items()}
        return all(ok for ok, _ in checks.values()), details
