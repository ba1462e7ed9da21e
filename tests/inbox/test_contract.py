"""The inbox contract: what every backend stores, deduplicates, leases and gives back.

Each test runs on SQLite and on PostgreSQL (the `inbox` fixture). A second
`inbox_place.open()` is another connection to the same inbox: another replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import zstandard

from receiver import parse_callback
from receiver.ids import new_id, process_of
from receiver.inbox import (
    VERIFY_RUN,
    Claim,
    Cutoffs,
    EventFilter,
    Lease,
    Pruned,
    Receipt,
    SchemaError,
)
from receiver.inbox.records import PACKED, pack
from tests.support.callbacks import ALL, job, load


def receipt(body: bytes, request_id: str = "r", headers: dict | None = None) -> Receipt:
    return Receipt(
        body,
        "http",
        datetime.now(timezone.utc),
        request_id,
        headers=headers if headers is not None else {"content-type": "application/xml"},
        source_meta={"request_id": request_id},
    )


def events_of(arrived: Receipt):
    """The receipt's events, as ingest makes them: with its headers, source and time."""
    return parse_callback(
        arrived.body,
        arrived.headers,
        source=arrived.source,
        source_meta=arrived.source_meta,
        received_at=arrived.received_at,
    )


async def store(inbox, name: str, handlers=("a", "b"), request_id: str = "r"):
    return await store_body(inbox, load(name), handlers, request_id)


async def store_body(inbox, body: bytes, handlers=("a",), request_id: str = "r"):
    return await inbox.store(
        receipt(body, request_id), [(e, list(handlers)) for e in parse_callback(body)]
    )


async def run_states(inbox, event_id: str) -> dict[str, tuple[str, int]]:
    detail = await inbox.event(event_id)
    return {run.handler: (run.status, run.attempts) for run in detail.runs}


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- ingest ---------------------------------------------------------------------------


async def test_an_event_is_stored_once_with_one_pending_run_per_handler(inbox):
    first = await store(inbox, "transcode.xml")
    again = await store(inbox, "transcode.xml")
    assert first.new == first.ids == ["job:j68427030f84611ecb8546d80f2baf56f:Success"]
    assert (again.new, again.duplicates) == ([], first.ids)
    assert await run_states(inbox, first.ids[0]) == {"a": ("pending", 0), "b": ("pending", 0)}
    # Both deliveries are kept as receipts: the second is marked a duplicate.
    receipts = await inbox.receipts()
    assert [(r.outcome, r.event_ids) for r in receipts] == [
        ("duplicate", first.ids),
        ("accepted", first.ids),
    ]
    assert receipts[1].id == first.receipt_id


@pytest.mark.parametrize("name", ALL)
async def test_an_event_reads_back_whole_with_its_document_rebuilt(inbox, name):
    # The inbox keeps the body once and no copy of the document in the event: reading the
    # event back decodes the body again, and must give the very event that was stored.
    body = load(name)
    headers = {"x-ci-content-version": "Detail"} if "detail" in name else {}
    arrived = receipt(body, headers=headers)
    events = events_of(arrived)
    stored = await inbox.store(arrived, [(e, ["a"]) for e in events])
    for event in events:
        if event.id not in stored.new:
            continue  # a callback naming one job twice
        detail = await inbox.event(event.id)
        assert detail.event.received_at == event.received_at
        assert detail.event == event
        assert detail.receipt_id == stored.receipt_id


async def test_two_replicas_storing_the_same_callback_at_once(inbox_place):
    first, second = await inbox_place.open(), await inbox_place.open()
    body = job("jrace")
    for _ in range(5):
        results = await asyncio.gather(store_body(first, body), store_body(second, body))
        body = job(f"jrace{_}")
        assert sorted(len(r.new) for r in results) == [0, 1]
        assert sorted(len(r.duplicates) for r in results) == [0, 1]
    assert len(await first.events(limit=100)) == 5
    assert (await first.backlog())["a"].pending == 5


async def test_a_batch_is_stored_as_each_callback_alone_would_be(inbox):
    """`store_many` (a batch of queued messages): each item stored or deduplicated as
    `store` would (the same job twice in one batch: one new, one duplicate), and one
    that cannot be stored fails alone while the others are kept."""
    transcode, snapshot = load("transcode.xml"), load("snapshot.xml")
    # A run without a handler, which the database refuses (NOT NULL).
    unstorable = [(e, [None]) for e in parse_callback(load("smartcover.xml"))]
    items = [
        (receipt(transcode, "1"), [(e, ["a"]) for e in parse_callback(transcode)], False, {}),
        (receipt(transcode, "2"), [(e, ["a"]) for e in parse_callback(transcode)], False, {}),
        (receipt(load("smartcover.xml"), "3"), unstorable, False, {}),
        (receipt(snapshot, "4"), [(e, ["a", "b"]) for e in parse_callback(snapshot)], False, {}),
    ]
    first, again, failed, other = await inbox.store_many(items)
    transcode_id = "job:j68427030f84611ecb8546d80f2baf56f:Success"
    assert first.ids == again.ids == [transcode_id]
    assert sorted([first.new, again.new]) == [[], [transcode_id]]
    assert isinstance(failed, Exception)
    assert other.new == other.ids
    assert await run_states(inbox, transcode_id) == {"a": ("pending", 0)}
    assert await run_states(inbox, other.ids[0]) == {"a": ("pending", 0), "b": ("pending", 0)}
    kept = sorted((r.outcome, r.event_ids) for r in await inbox.receipts())
    expected = [
        ("accepted", [transcode_id]),
        ("accepted", other.ids),
        ("duplicate", [transcode_id]),
    ]
    assert kept == sorted(expected)


async def test_the_same_job_in_xml_and_json_is_one_event(inbox):
    xml = await store(inbox, "smartcover.xml")
    json = await store(inbox, "smartcover.json")
    assert json.duplicates == xml.new


async def test_a_callback_with_a_new_and_a_known_event(inbox):
    await store(inbox, "smartcover.xml")
    known = {"JobId": "j6842765cf84611ecb8546d80f2baf56f", "State": "Success"}
    body = orjson.dumps({"JobsDetail": [known, {"JobId": "jnew", "State": "Success"}]})
    stored = await store_body(inbox, body)
    assert stored.ids == ["job:j6842765cf84611ecb8546d80f2baf56f:Success", "job:jnew:Success"]
    assert (stored.new, stored.duplicates) == (["job:jnew:Success"], stored.ids[:1])


async def test_a_callback_naming_one_job_twice_stores_it_once(inbox):
    entry = {"JobId": "jtwice", "State": "Success"}
    stored = await store_body(inbox, orjson.dumps({"JobsDetail": [entry, entry]}))
    assert (stored.new, stored.duplicates) == (["job:jtwice:Success"], ["job:jtwice:Success"])
    assert await run_states(inbox, "job:jtwice:Success") == {"a": ("pending", 0)}


async def test_values_a_database_would_refuse_are_kept(inbox):
    # NUL is valid in a JSON string, and text columns of PostgreSQL refuse it. (Ids
    # are refused with a NUL, so such a value reaches only the other columns.)
    body = job("jnul", key="a\u0000b.mp4")
    stored = await store_body(inbox, body)
    assert stored.new
    (event,) = parse_callback(body)
    detail = await inbox.event(stored.new[0])
    assert detail.event.input.key == event.input.key == "a\u0000b.mp4"
    (listed,) = await inbox.events()
    assert listed.key in ("a\u0000b.mp4", "a\ufffdb.mp4")  # the column may not hold NUL


async def test_a_list_gives_each_events_source_as_its_record_does(inbox):
    pushed = receipt(load("transcode.xml"), headers={"x-cmq-message-id": "m-1"})
    pushed.source = "cmq-push"  # as ingest keeps a receipt a CMQ topic pushed
    queued = dataclasses.replace(receipt(load("smartcover.xml")), source="tdmq")
    for arrived in (pushed, queued):
        await inbox.store(arrived, [(e, ["a"]) for e in events_of(arrived)])
    listed = await inbox.events()
    assert [summary.source for summary in listed] == ["tdmq", "cmq-push"]
    for summary in listed:
        assert (await inbox.event(summary.id)).event.source == summary.source
    assert (await inbox.event(listed[1].id)).event.source_meta["message_id"] == "m-1"


async def test_a_rejected_body_is_kept_up_to_the_bound_with_its_full_size(inbox_place):
    inbox_place.config.inbox.rejected_body_bytes = 16
    inbox = await inbox_place.open()
    body = b"<Response>" + b"x" * 100
    receipt_id = await inbox.reject(receipt(body), "malformed_xml", "no end tag")
    (summary,) = await inbox.receipts(outcome="rejected")
    assert (summary.id, summary.size, summary.error_reason, summary.error_detail) == (
        receipt_id,
        len(body),
        "malformed_xml",
        "no end tag",
    )
    kept = await inbox.receipt(receipt_id)
    assert kept.body == body[:16]
    assert kept.cut_from == len(body)
    assert kept.headers == {"content-type": "application/xml"}
    assert await inbox.events() == []


async def test_a_receipt_reads_back_as_it_arrived(inbox):
    stored = await store(inbox, "smartcover.json")
    kept = await inbox.receipt(stored.receipt_id)
    assert kept.body == load("smartcover.json")
    assert (kept.source, kept.request_id, kept.cut_from) == ("http", "r", None)
    assert kept.source_meta == {"request_id": "r"}
    assert await inbox.receipt(stored.receipt_id + 1000) is None


async def test_bodies_are_kept_zstd_packed_and_read_back_byte_for_byte(inbox_place):
    inbox = await inbox_place.open()
    bodies = {}
    for name in ALL:
        stored = await store_body(inbox, load(name), request_id=name)
        if stored.new:  # a callback of the same job as one before is a duplicate
            bodies[stored.receipt_id] = load(name)
    # A refused body that begins as a packed one is still kept as it came.
    looks_packed = PACKED + b"not zstd"
    bodies[await inbox.reject(receipt(looks_packed), "not_xml_or_json", "")] = looks_packed
    kept = dict(await inbox_place.sql("SELECT id, body FROM receipts"))
    for receipt_id, body in bodies.items():
        assert kept[receipt_id].startswith(PACKED)
        if body != looks_packed:
            assert zstandard.decompress(kept[receipt_id][len(PACKED) :]) == body
        assert (await inbox.receipt(receipt_id)).body == body


# --- dispatch -------------------------------------------------------------------------


async def test_claims_are_exclusive_until_the_lease_ends(inbox):
    ids = (await store(inbox, "two_jobs.xml", handlers=["a"])).new
    first = await inbox.claim("a", 1, lease_seconds=30)
    second = await inbox.claim("a", 5, lease_seconds=30)
    assert sorted(c.event.id for c in first + second) == sorted(ids)
    assert await inbox.claim("a", 5, lease_seconds=30) == []
    assert (first[0].request_id, first[0].attempts) == ("r", 0)
    # A claimed event is the stored one, document included.
    assert first[0].event.raw


async def test_claims_of_replicas_never_overlap(inbox_place):
    replicas = [await inbox_place.open() for _ in range(3)]
    for n in range(30):
        await store_body(replicas[0], job(f"jc{n}"))
    claims = await asyncio.gather(*[r.claim("a", 7, 30) for r in replicas for _ in range(2)])
    claimed = [c.event.id for batch in claims for c in batch]
    assert len(claimed) == len(set(claimed)) == 30


async def test_a_lease_that_ended_is_taken_over_and_the_late_report_refused(inbox_place):
    dead, alive = await inbox_place.open(), await inbox_place.open()
    (event_id,) = (await store_body(dead, job("jlease"))).new
    (lost,) = await dead.claim("a", 1, lease_seconds=0.2)
    assert await alive.claim("a", 1, 30) == []  # leased
    await asyncio.sleep(0.4)
    (taken,) = await alive.claim("a", 1, 30)
    assert (taken.event.id, taken.attempts) == (event_id, 0)
    assert not await dead.finish(lost, "done", started_at=now())
    assert await alive.finish(taken, "done", started_at=now())
    assert await run_states(alive, event_id) == {"a": ("done", 1)}


async def store_leased(inbox, body: bytes, leases: dict, handlers=("a", "b")):
    """`body` stored with its runs named in `leases` ({(job id, handler): Lease}) leased."""
    events = parse_callback(body)
    by_event = {(e.id, h): lease for e in events for (j, h), lease in leases.items() if j in e.id}
    arrived = receipt(body, "rl")
    return events, await inbox.store(
        arrived, [(e, list(handlers)) for e in events], leases=by_event
    )


async def test_a_run_stored_leased_is_the_storers_until_its_outcome(inbox_place):
    storer, other = await inbox_place.open(), await inbox_place.open()
    (event,), stored = await store_leased(
        storer, job("jleased"), {("jleased", "a"): Lease("t1", 30)}
    )
    assert stored.new == [event.id]
    # Not claimable by anyone while leased; the run stored without a lease is.
    assert await other.claim("a", 5, 30) == []
    assert [c.event.id for c in await other.claim("b", 5, 30)] == [event.id]
    # The storer records its outcome with the lease's token, as after a claim.
    assert not await storer.finish(Claim(event, "a", 0, "wrong", "rl"), "done", started_at=now())
    assert await storer.finish(Claim(event, "a", 0, "t1", "rl"), "done", started_at=now())
    assert (await run_states(other, event.id))["a"] == ("done", 1)


async def test_a_lease_taken_at_store_ends_like_a_claims(inbox_place):
    dead, alive = await inbox_place.open(), await inbox_place.open()
    (event,), _ = await store_leased(dead, job("jshort"), {("jshort", "a"): Lease("t", 0.2)})
    assert await alive.claim("a", 1, 30) == []
    await asyncio.sleep(0.4)
    (taken,) = await alive.claim("a", 1, 30)
    assert (taken.event.id, taken.attempts, taken.request_id) == (event.id, 0, "rl")
    assert not await dead.finish(Claim(event, "a", 0, "t", "rl"), "done", started_at=now())


async def test_a_duplicate_stored_with_a_lease_leaves_the_stored_run_alone(inbox):
    (event,), _ = await store_leased(inbox, job("jdup"), {}, handlers=["a"])
    _, again = await store_leased(inbox, job("jdup"), {("jdup", "a"): Lease("late", 30)}, ["a"])
    assert (again.new, again.duplicates) == ([], [event.id])
    (claim,) = await inbox.claim("a", 1, 30)  # not leased by the duplicate
    assert claim.event.id == event.id
    assert not await inbox.finish(Claim(event, "a", 0, "late", "rl"), "done", started_at=now())


async def test_leased_runs_of_a_batch_are_each_the_leases_of_their_callback(inbox):
    bodies = [job(f"jbatch{i}") for i in range(3)]
    items = []
    for i, body in enumerate(bodies):
        events = parse_callback(body)
        leases = {(events[0].id, "a"): Lease(f"t{i}", 30)} if i != 1 else {}
        items.append((receipt(body, f"r{i}"), [(e, ["a"]) for e in events], False, leases))
    stored = await inbox.store_many(items)
    (claim,) = await inbox.claim("a", 5, 30)  # only the one stored without a lease
    assert claim.event.id == stored[1].new[0]
    for i in (0, 2):
        (event,) = parse_callback(bodies[i])
        assert await inbox.finish(Claim(event, "a", 0, f"t{i}", f"r{i}"), "done", started_at=now())


async def test_a_verified_events_held_runs_are_never_stored_leased(inbox):
    body = job("jverify")
    (event,) = parse_callback(body)
    leases = {(event.id, VERIFY_RUN): Lease("v", 30), (event.id, "a"): Lease("h", 30)}
    await inbox.store(receipt(body), [(event, ["a"])], verify=True, leases=leases)
    assert await inbox.claim(VERIFY_RUN, 5, 30) == []  # leased to the storer
    assert await inbox.settle(event.id, genuine=True)
    # The held run became pending unleased: anyone may claim it.
    assert [c.event.id for c in await inbox.claim("a", 5, 30)] == [event.id]


async def test_outcomes_reported_together_are_each_refused_or_recorded(inbox_place):
    dead, alive = await inbox_place.open(), await inbox_place.open()
    ids = [(await store_body(dead, job(f"jtogether{n}"))).new[0] for n in range(3)]
    held = await dead.claim("a", 2, lease_seconds=30)
    (lost,) = await dead.claim("a", 1, lease_seconds=0.2)
    await asyncio.sleep(0.4)
    (taken,) = await alive.claim("a", 1, 30)
    # In one batch, whose rows PostgreSQL takes in its runs' key order, not in this one.
    reports = [(held[0], "done"), (lost, "retry"), (held[1], "done")]
    recorded = await asyncio.gather(
        *(dead.finish(claim, outcome, started_at=now()) for claim, outcome in reports)
    )
    assert recorded == [True, False, True]
    assert await alive.finish(taken, "dead", started_at=now(), error="x")
    states = {event_id: await run_states(alive, event_id) for event_id in ids}
    assert sorted(state["a"] for state in states.values()) == [("dead", 1), *[("done", 1)] * 2]
    for event_id in ids:
        assert len((await alive.event(event_id)).attempts) == 1


async def test_finish_records_the_outcome_and_schedules_a_retry(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    (claim,) = await inbox.claim("a", 1, 30)
    later = datetime(2099, 1, 1, tzinfo=timezone.utc)
    started = now()
    assert await inbox.finish(claim, "retry", started_at=started, error="boom", retry_at=later)
    assert abs(await inbox.next_due(["a"]) - later) < timedelta(seconds=1)
    assert await inbox.claim("a", 1, 30) == []
    run = (await inbox.event(event_id)).runs[0]
    assert (run.status, run.attempts, run.last_error, run.due_at) == ("pending", 1, "boom", later)
    (attempt,) = (await inbox.event(event_id)).attempts
    assert (attempt.handler, attempt.number, attempt.outcome, attempt.error) == (
        "a",
        1,
        "retry",
        "boom",
    )
    assert abs(attempt.started_at - started) < timedelta(milliseconds=1)


async def test_a_run_due_again_is_claimed_with_its_attempts(inbox):
    (event_id,) = (await store_body(inbox, job("jretry"))).new
    (claim,) = await inbox.claim("a", 1, 30)
    await inbox.finish(claim, "retry", started_at=now(), error="e1", retry_at=now())
    (again,) = await inbox.claim("a", 1, 30)
    assert again.attempts == 1
    await inbox.finish(again, "dead", started_at=now(), error="e2")
    assert await run_states(inbox, event_id) == {"a": ("dead", 2)}
    assert [(a.number, a.outcome) for a in (await inbox.event(event_id)).attempts] == [
        (1, "retry"),
        (2, "dead"),
    ]
    assert (await inbox.backlog())["a"].dead == 1


async def test_a_released_run_is_not_counted_as_an_attempt(inbox):
    (event_id,) = (await store_body(inbox, job("jrelease"))).new
    (claim,) = await inbox.claim("a", 1, 30)
    assert await inbox.finish(claim, "released", started_at=now(), error="interrupted")
    assert await run_states(inbox, event_id) == {"a": ("pending", 0)}
    (again,) = await inbox.claim("a", 1, 30)
    assert again.attempts == 0


async def test_next_due_counts_leases_and_only_the_named_handlers(inbox):
    assert await inbox.next_due(["a"]) is None
    await store_body(inbox, job("jdue"), handlers=["a", "b"])
    assert await inbox.next_due([]) is None
    assert await inbox.next_due(["a"]) <= now()
    await inbox.claim("a", 1, lease_seconds=60)
    lease_end = await inbox.next_due(["a"])
    assert timedelta(seconds=50) < lease_end - now() < timedelta(seconds=70)
    assert await inbox.next_due(["b"]) <= now()


async def test_known_claims_are_not_read_back(inbox):
    body = job("jknown")
    (event,) = parse_callback(body)
    await inbox.store(receipt(body), [(event, ["a"])])
    (claim,) = await inbox.claim("a", 1, 30, known={event.id: event})
    assert claim.event is event


async def test_a_known_event_pushed_out_while_the_others_are_read_is_still_claimed(
    inbox, monkeypatch
):
    # `known` is the dispatcher's `FreshEvents`: new callbacks may push events out of it
    # while the claim reads back those it does not hold.
    held_body = job("jheld")
    (held,) = parse_callback(held_body)
    await inbox.store(receipt(held_body), [(held, ["a"])])
    (read_id,) = (await store_body(inbox, job("jread"))).new
    known = {held.id: held}
    read = inbox.connector.read

    async def pushing_out(work):
        known.clear()
        return await read(work)

    monkeypatch.setattr(inbox.connector, "read", pushing_out)
    claims = await inbox.claim("a", 2, 30, known=known)
    assert sorted(claim.event.id for claim in claims) == sorted([held.id, read_id])


# --- replay ---------------------------------------------------------------------------


async def test_requeue_named_handlers_backfills_every_event(inbox):
    await store(inbox, "two_jobs.xml", handlers=[])
    await store(inbox, "transcode.xml", handlers=["a"])
    assert await inbox.requeue(None, ["new"], dead_only=False) == 3
    backlog = await inbox.backlog()
    assert {name: entry.pending for name, entry in backlog.items()} == {"a": 1, "new": 3}


async def test_requeue_dead_letters_only(inbox):
    dead_id = (await store_body(inbox, job("jdead"))).new[0]
    done_id = (await store_body(inbox, job("jdone"))).new[0]
    for claim in await inbox.claim("a", 2, 30):
        outcome = "dead" if claim.event.id == dead_id else "done"
        await inbox.finish(claim, outcome, started_at=now(), error="x")
    assert await inbox.requeue(None, None, dead_only=True) == 1
    assert await run_states(inbox, dead_id) == {"a": ("pending", 0)}
    assert await run_states(inbox, done_id) == {"a": ("done", 1)}
    assert (await inbox.event(dead_id)).runs[0].last_error is None


async def test_requeue_chosen_events_and_handlers(inbox):
    (event_id,) = (await store_body(inbox, job("jpick"), handlers=["a", "b"])).new
    for handler in ("a", "b"):
        (claim,) = await inbox.claim(handler, 1, 30)
        await inbox.finish(claim, "done", started_at=now())
    assert await inbox.requeue([event_id], None, dead_only=True) == 0  # nothing dead
    assert await inbox.requeue([event_id], ["b", "new"], dead_only=False, dry_run=True) == 2
    assert await run_states(inbox, event_id) == {"a": ("done", 1), "b": ("done", 1)}
    assert await inbox.requeue([event_id], ["b"], dead_only=False) == 1
    assert await run_states(inbox, event_id) == {"a": ("done", 1), "b": ("pending", 0)}
    assert await inbox.requeue([event_id], None, dead_only=False) == 2
    assert await inbox.requeue(["job:nothing:Success"], None, dead_only=False) == 0


async def test_requeue_among_handlers_resets_only_their_runs(inbox):
    # What replay does with no handler named: the runs of the handlers some process runs.
    (event_id,) = (await store_body(inbox, job("jamong"), handlers=["a", "gone"])).new
    for handler in ("a", "gone"):
        (claim,) = await inbox.claim(handler, 1, 30)
        await inbox.finish(claim, "dead", started_at=now(), error="x")
    assert await inbox.runs_by_handler([event_id], dead_only=True) == {"a": 1, "gone": 1}
    assert await inbox.requeue([event_id], None, among=[], dead_only=True) == 0
    assert await inbox.requeue([event_id], None, among=["a", "b"], dead_only=True) == 1
    assert await run_states(inbox, event_id) == {"a": ("pending", 0), "gone": ("dead", 1)}
    assert await inbox.runs_by_handler([event_id], dead_only=True) == {"gone": 1}
    assert await inbox.runs_by_handler([event_id], dead_only=False) == {"a": 1, "gone": 1}
    assert await inbox.runs_by_handler(["job:nothing:Success"], dead_only=False) == {}


async def test_a_leased_run_is_not_requeued_under_its_runner(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    await inbox.claim("a", 1, 30)
    assert await inbox.requeue([event_id], None, dead_only=False) == 0
    assert await inbox.requeue([event_id], ["a"], dead_only=False) == 0


async def test_a_replayed_run_refuses_the_report_of_its_old_lease(inbox):
    (event_id,) = (await store_body(inbox, job("jold"))).new
    (claim,) = await inbox.claim("a", 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    assert await inbox.requeue([event_id], None, dead_only=False) == 1
    assert not await inbox.finish(claim, "dead", started_at=now())
    assert await run_states(inbox, event_id) == {"a": ("pending", 0)}


# --- verification ---------------------------------------------------------------------


async def store_verified(inbox, job_id: str, handlers=("a", "b")) -> str:
    body = job(job_id)
    routed = [(e, list(handlers)) for e in parse_callback(body)]
    (event_id,) = (await inbox.store(receipt(body), routed, verify=True)).new
    return event_id


async def test_a_verified_event_is_held_until_its_verification_says_genuine(inbox):
    event_id = await store_verified(inbox, "jheld")
    assert await run_states(inbox, event_id) == {
        VERIFY_RUN: ("pending", 0),
        "a": ("held", 0),
        "b": ("held", 0),
    }
    assert await inbox.claim("a", 5, 30) == []
    assert await inbox.next_due(["a", "b"]) is None
    (check,) = await inbox.claim(VERIFY_RUN, 5, 30)
    assert check.event.id == event_id
    assert await inbox.settle(event_id, genuine=True) == 2
    assert await inbox.settle(event_id, genuine=False) == 0  # settled once, for good
    assert await inbox.finish(check, "done", started_at=now())
    assert [c.event.id for c in await inbox.claim("a", 5, 30)] == [event_id]
    assert await run_states(inbox, event_id) == {
        VERIFY_RUN: ("done", 1),
        "a": ("pending", 0),
        "b": ("pending", 0),
    }
    # A duplicate of a verified event adds nothing to verify.
    body = job("jheld")
    again = await inbox.store(
        receipt(body), [(e, ["a"]) for e in parse_callback(body)], verify=True
    )
    assert again.duplicates == [event_id]


async def test_a_forged_event_never_runs_and_is_listed_as_forged(inbox):
    genuine = await store_verified(inbox, "jgenuine")
    forged = await store_verified(inbox, "jforged")
    checks = {c.event.id: c for c in await inbox.claim(VERIFY_RUN, 5, 30)}
    assert await inbox.settle(forged, genuine=False) == 2
    reason = "CI's job API says State=Failed"
    assert await inbox.finish(checks[forged], "forged", started_at=now(), error=reason)
    assert await run_states(inbox, forged) == {
        VERIFY_RUN: ("forged", 1),
        "a": ("forged", 0),
        "b": ("forged", 0),
    }
    detail = await inbox.event(forged)
    assert [(a.handler, a.outcome, a.error) for a in detail.attempts] == [
        (VERIFY_RUN, "forged", reason)
    ]
    assert await inbox.claim("a", 5, 30) == []
    listed = await inbox.events(EventFilter(status="forged"))
    assert [e.id for e in listed] == [forged]
    assert [e.id for e in await inbox.events(EventFilter(status="held"))] == [genuine]
    # What is left to do: the other event's verification, and nothing of the forged one.
    assert {name: b.pending for name, b in (await inbox.backlog()).items()} == {VERIFY_RUN: 1}


async def test_a_forged_event_is_replaced_by_the_next_delivery_of_its_id(inbox):
    forged = await store_verified(inbox, "jtaken", handlers=["a"])
    (check,) = await inbox.claim(VERIFY_RUN, 5, 30)
    await inbox.settle(forged, genuine=False)
    await inbox.finish(check, "forged", started_at=now())
    # The reconciler asks which events it need not recover: not this one.
    assert await inbox.known([forged]) == {forged}
    assert await inbox.known([forged], forged=False) == set()
    # The genuine delivery (here from the reconciler, unverified) takes the id over.
    body = job("jtaken", key="the/real/input.mp4")
    stored = await inbox.store(receipt(body), [(e, ["a"]) for e in parse_callback(body)])
    assert (stored.new, stored.duplicates) == ([forged], [])
    assert await run_states(inbox, forged) == {"a": ("pending", 0)}
    detail = await inbox.event(forged)
    assert detail.event.input.key == "the/real/input.mp4"
    # The verdict on the forgery stays on record.
    assert [(a.handler, a.outcome) for a in detail.attempts] == [(VERIFY_RUN, "forged")]
    assert detail.receipt_id == stored.receipt_id
    assert await inbox.known([forged], forged=False) == {forged}
    # Once not forged, the id is an ordinary duplicate again.
    assert (await store_body(inbox, body)).duplicates == [forged]


async def test_deliveries_of_one_event_at_one_moment_store_it_once(inbox):
    # Stored at one moment, as a burst's are (on PostgreSQL, in one statement): as if
    # one after the other, the first stores the event and the others find a duplicate.
    bodies = [job("jsame") if i % 2 else job(f"jother{i}") for i in range(12)]
    stored = await asyncio.gather(*(store_body(inbox, body) for body in bodies))
    by_body = list(zip(bodies, stored, strict=True))
    same = [s for body, s in by_body if b"jsame" in body]
    assert [len(s.new) for s in same] == [1, 0, 0, 0, 0, 0]
    assert all(s.duplicates == same[0].new for s in same[1:])
    assert all(len(s.new) == 1 for body, s in by_body if b"jsame" not in body)
    assert await run_states(inbox, same[0].new[0]) == {"a": ("pending", 0)}
    outcomes = {r.id: r.outcome for r in await inbox.receipts()}
    assert [outcomes[s.receipt_id] for s in same] == ["accepted"] + ["duplicate"] * 5


async def test_a_forged_event_delivered_again_several_times_at_once_is_replaced_once(inbox):
    forged = await store_verified(inbox, "jtaken", handlers=["a"])
    (check,) = await inbox.claim(VERIFY_RUN, 5, 30)
    await inbox.settle(forged, genuine=False)
    await inbox.finish(check, "forged", started_at=now())
    bodies = [job("jtaken", key=f"the/input{i}.mp4") for i in range(4)]
    stored = await asyncio.gather(*(store_body(inbox, body) for body in bodies))
    assert [(s.new, s.duplicates) for s in stored] == [([forged], [])] + [([], [forged])] * 3
    assert await run_states(inbox, forged) == {"a": ("pending", 0)}
    detail = await inbox.event(forged)
    assert (detail.event.input.key, detail.receipt_id) == ("the/input0.mp4", stored[0].receipt_id)


async def test_replay_releases_a_held_or_forged_event_only_when_named(inbox):
    plain = (await store_body(inbox, job("jplain"))).new[0]
    held = await store_verified(inbox, "jwaiting", handlers=["a"])
    forged = await store_verified(inbox, "jfake", handlers=["a"])
    await inbox.settle(forged, genuine=False)
    (check,) = [c for c in await inbox.claim(VERIFY_RUN, 5, 30) if c.event.id == forged]
    await inbox.finish(check, "forged", started_at=now())
    # Every event, every handler: only the plain event's run.
    assert await inbox.requeue(None, None, dead_only=False) == 1
    # A backfill: the held event's new run waits with its others; the forged one gets none.
    assert await inbox.requeue(None, ["new"], dead_only=False) == 2
    assert await run_states(inbox, held) == {
        VERIFY_RUN: ("pending", 0),
        "a": ("held", 0),
        "new": ("held", 0),
    }
    assert "new" not in await run_states(inbox, forged)
    assert await inbox.settle(held, genuine=True) == 2
    # Named, a forged event's runs are released; its verdict stays on record.
    assert await inbox.requeue([forged], None, dead_only=False) == 1
    assert await run_states(inbox, forged) == {VERIFY_RUN: ("forged", 1), "a": ("pending", 0)}
    assert [c.event.id for c in await inbox.claim("a", 5, 30)] == [plain, held, forged]
    assert await inbox.requeue([forged], ["b"], dead_only=False) == 1


async def test_a_released_forged_event_is_not_replaced_by_its_next_delivery(inbox):
    # An operator vouched for it and its handler ran: the reconciler must not recover its
    # job, nor a delivery of its id replace it and run the handler again.
    forged = await store_verified(inbox, "jvouched", handlers=["a"])
    (check,) = await inbox.claim(VERIFY_RUN, 5, 30)
    await inbox.settle(forged, genuine=False)
    await inbox.finish(check, "forged", started_at=now())
    assert await inbox.requeue([forged], None, dead_only=False) == 1
    (run,) = await inbox.claim("a", 5, 30)
    assert await inbox.finish(run, "done", started_at=now())
    assert await inbox.known([forged], forged=False) == {forged}
    body = job("jvouched", key="the/real/input.mp4")
    stored = await inbox.store(receipt(body), [(e, ["a"]) for e in parse_callback(body)])
    assert (stored.new, stored.duplicates) == ([], [forged])
    assert await run_states(inbox, forged) == {VERIFY_RUN: ("forged", 1), "a": ("done", 1)}
    # Still listed as forged: the verdict stays on record.
    assert [e.id for e in await inbox.events(EventFilter(status="forged"))] == [forged]


# --- reading --------------------------------------------------------------------------


async def test_events_filter_by_fields_and_run_status(inbox):
    await store(inbox, "transcode.xml")
    await store(inbox, "smartcover_failed.xml")
    await store(inbox, "workflow_finish.xml")
    assert [e.tag for e in await inbox.events(EventFilter(state="Failed"))] == ["SmartCover"]
    assert [e.kind for e in await inbox.events(EventFilter(kind="workflow"))] == ["workflow"]
    assert len(await inbox.events(EventFilter(status="pending"))) == 3
    assert await inbox.events(EventFilter(status="dead")) == []
    transcode = parse_callback(load("transcode.xml"))[0]
    (found,) = await inbox.events(EventFilter(job_id=transcode.job_id))
    assert (found.id, found.tag, found.bucket, found.key) == (
        transcode.id,
        "Transcode",
        transcode.input.bucket,
        transcode.input.key,
    )
    assert [r.handler for r in found.runs] == ["a", "b"]


async def test_events_filter_by_handler_key_bucket_and_time(inbox):
    start = now()
    await store_body(inbox, job("j1", key="videos/a.mp4"), handlers=["a"])
    await store_body(inbox, job("j2", key="videos/b.mov"), handlers=["b"])
    await store_body(inbox, job("j3", key="other/c.mp4"), handlers=["a", "b"])
    middle = now()
    await store_body(inbox, job("j4", key="videos/50%_[x].mp4"), handlers=[])

    async def ids(**fields) -> list[str]:
        return [e.job_id for e in await inbox.events(EventFilter(**fields))]

    assert await ids(key="videos/*.mp4") == ["j4", "j1"]
    assert await ids(key="videos/?.mov") == ["j2"]
    assert await ids(key="videos/50%_[x].mp4") == ["j4"]  # only * and ? are special
    assert await ids(key="videos/50%") == []
    assert await ids(handler="b") == ["j3", "j2"]
    assert await ids(handler="a", status="pending") == ["j3", "j1"]
    assert await ids(bucket="media-1250000000", tag="Transcode") == ["j4", "j3", "j2", "j1"]
    assert await ids(bucket="nope") == []
    assert await ids(since=middle) == ["j4"]
    assert await ids(since=start, until=middle) == ["j3", "j2", "j1"]


async def test_events_page_by_cursor(inbox):
    for n in range(7):
        await store_body(inbox, job(f"jp{n}"))
    pages, before = [], None
    while page := await inbox.events(limit=3, before=before):
        pages.append([e.job_id for e in page])
        before = page[-1].seq
    assert pages == [["jp6", "jp5", "jp4"], ["jp3", "jp2", "jp1"], ["jp0"]]
    oldest_first, after = [], 0
    while chunk := await inbox.event_ids(EventFilter(tag="Transcode"), limit=4, after=after):
        oldest_first += [event_id for _, event_id in chunk]
        after = chunk[-1][0]
    assert oldest_first == [f"job:jp{n}:Success" for n in range(7)]
    newest = max(seq for seq, _ in await inbox.event_ids())
    assert await inbox.matching(EventFilter(tag="Transcode")) == (7, newest)
    await store_body(inbox, job("jlater"))
    through = await inbox.event_ids(EventFilter(tag="Transcode"), after=0, through=newest)
    assert [event_id for _, event_id in through] == oldest_first  # not the later one
    assert await inbox.matching(EventFilter(tag="NoSuchTag")) == (0, 0)


async def test_receipts_page_and_filter_by_outcome(inbox):
    await store_body(inbox, job("jr"))
    await store_body(inbox, job("jr"))
    await inbox.reject(receipt(b"nope"), "not_xml_or_json", "n")
    assert [r.outcome for r in await inbox.receipts()] == ["rejected", "duplicate", "accepted"]
    first = await inbox.receipts(limit=2)
    rest = await inbox.receipts(before=first[-1].id)
    assert [r.outcome for r in rest] == ["accepted"]
    assert [r.outcome for r in await inbox.receipts(outcome="duplicate")] == ["duplicate"]


async def test_rejected_receipts_page_with_their_first_bytes_and_headers(inbox):
    await store_body(inbox, job("jrej"))
    first = await inbox.reject(
        receipt(b"<x>" + b"a" * 100, headers={"user-agent": "curl/8"}), "malformed_xml", "no end"
    )
    second = receipt(b"\x00\xffnot json")
    second.source_meta = {"message_id": "m1"}
    await inbox.reject(second, "not_xml_or_json", "starts with NUL", size=5000)
    newest, oldest = await inbox.rejected(preview=4)
    assert (newest.reason, newest.detail, newest.source) == (
        "not_xml_or_json",
        "starts with NUL",
        "http",
    )
    assert (newest.size, newest.kept, newest.preview) == (5000, 10, b"\x00\xffno")
    assert newest.source_meta == {"message_id": "m1"}
    assert (oldest.id, oldest.size, oldest.kept, oldest.preview) == (first, 103, 103, b"<x>a")
    assert oldest.headers == {"user-agent": "curl/8"}
    assert oldest.request_id == "r"
    assert [r.id for r in await inbox.rejected(before=newest.id)] == [first]
    assert await inbox.rejected(before=first) == []
    assert len(await inbox.rejected(limit=1)) == 1


async def test_filtering_by_a_rare_run_status_among_many_finds_the_newest(inbox):
    # Most runs done, a few dead of one handler: both ways of finding them agree.
    for n in range(30):
        await store_body(inbox, job(f"jmany{n}", state="Failed" if n % 7 == 3 else "Success"))
    while claims := await inbox.claim("a", 50, 30):
        for claim in claims:
            outcome = "dead" if claim.event.state == "Failed" else "done"
            await inbox.finish(claim, outcome, started_at=now())

    async def jobs(**fields) -> list[str]:
        return [e.job_id for e in await inbox.events(EventFilter(**fields), limit=3)]

    assert await jobs(status="dead") == ["jmany24", "jmany17", "jmany10"]
    assert await jobs(status="dead", handler="a") == ["jmany24", "jmany17", "jmany10"]
    assert await jobs(status="done") == ["jmany29", "jmany28", "jmany27"]
    assert await jobs(status="done", handler="a") == ["jmany29", "jmany28", "jmany27"]
    assert await jobs(status="dead", handler="b") == []
    assert await jobs(status="forged") == []
    dead = await inbox.event_ids(EventFilter(status="dead"), after=0)
    assert [event_id for _, event_id in dead] == [f"job:jmany{n}:Failed" for n in (3, 10, 17, 24)]


async def test_known_tells_which_events_are_stored(inbox):
    stored = await store_body(inbox, job("jk"))
    assert await inbox.known([*stored.new, "job:missing:Success"]) == set(stored.new)
    assert await inbox.known([]) == set()
    many = [f"job:x{n}:Success" for n in range(1200)]
    assert await inbox.known(many) == set()


async def test_state_is_kept(inbox_place):
    inbox = await inbox_place.open()
    assert await inbox.get_state("reconcile:cursor") is None
    await inbox.set_state("reconcile:cursor", "2026-11-30T00:00:00+00:00")
    await inbox.set_state("reconcile:cursor", "2026-11-30T01:00:00+00:00")
    # A key named like one of the inbox's own settings is apart from it.
    await inbox.set_state("schema_version", "999")
    other = await inbox_place.open()  # would refuse a schema version it does not know
    assert await other.get_state("reconcile:cursor") == "2026-11-30T01:00:00+00:00"
    assert await other.get_state("schema_version") == "999"


async def test_the_inbox_reopens_with_everything_in_it(inbox_place):
    first = await inbox_place.open()
    stored = await store(first, "transcode.xml")
    await first.close()
    again = await inbox_place.open()
    assert (await store(again, "transcode.xml")).duplicates == stored.new
    backlog = await again.backlog()
    assert {name: entry.pending for name, entry in backlog.items()} == {"a": 1, "b": 1}


async def test_a_read_only_inbox_reads_and_never_writes(inbox_place):
    writer = await inbox_place.open()
    stored = await store(writer, "transcode.xml")
    reader = await inbox_place.open(read_only=True)
    assert [e.id for e in await reader.events()] == stored.new
    assert (await reader.event(stored.new[0])).event.raw
    with pytest.raises(Exception):  # noqa: B017, PT011 (each backend refuses its own way)
        await store(reader, "smartcover.xml")
    assert len(await writer.events()) == 1


async def test_a_newer_schema_is_a_clear_error(inbox_place):
    inbox = await inbox_place.open()
    await inbox.close()
    await set_schema_version(inbox_place, 99)
    with pytest.raises(SchemaError, match="newer ci-receiver"):
        await inbox_place.open()


async def set_schema_version(place, version: int) -> None:
    await place.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", str(version))


# --- counts, loading, size ------------------------------------------------------------


async def test_counts_since_a_moment(inbox):
    old = receipt(job("jold"))
    old.received_at = now() - timedelta(days=2)
    await inbox.store(old, [(e, ["a"]) for e in parse_callback(old.body)])
    since = now() - timedelta(hours=1)
    await store_body(inbox, job("j1", state="Failed"), handlers=["a", "b"])
    await store_body(inbox, job("j1", state="Failed"))
    await store(inbox, "workflow_finish.xml", handlers=["a"])
    await inbox.reject(receipt(b"x"), "not_xml_or_json", "x")
    (claim,) = await inbox.claim("b", 1, 30)
    await inbox.finish(claim, "dead", started_at=now())
    counts = await inbox.counts(since)
    assert counts.receipts == {"accepted": 2, "duplicate": 1, "rejected": 1}
    assert counts.tags == {"Transcode": 1, "WorkflowFinish": 1}
    assert counts.states == {"Failed": 1, "Success": 1}
    assert counts.runs == {"a": {"pending": 2}, "b": {"dead": 1}}


async def test_traffic_per_minute_by_outcome_and_events_by_tag_and_state(inbox):
    minute = datetime.fromtimestamp(now().timestamp() // 60 * 60, timezone.utc)
    earlier, later = minute - timedelta(minutes=30), minute - timedelta(minutes=5)

    def at(moment: datetime, body: bytes) -> Receipt:
        arrived = receipt(body)
        arrived.received_at = moment
        return arrived

    async def accept(moment: datetime, body: bytes) -> None:
        arrived = at(moment, body)
        await inbox.store(arrived, [(e, ["a"]) for e in parse_callback(body)])

    await accept(minute - timedelta(hours=25), job("jold"))  # before the period
    await accept(earlier + timedelta(seconds=1), job("j1", state="Failed"))
    await accept(earlier + timedelta(seconds=59), job("j1", state="Failed"))  # a duplicate
    await accept(later, load("workflow_finish.xml"))
    await accept(later + timedelta(seconds=30), job("j2", tag="Snapshot"))
    await inbox.reject(at(later, b"nope"), "not_xml_or_json", "n")
    traffic = await inbox.traffic(minute - timedelta(hours=24))
    assert traffic.step == 60
    assert traffic.callbacks == [
        (earlier, "accepted", 1),
        (earlier, "duplicate", 1),
        (later, "accepted", 2),
        (later, "rejected", 1),
    ]
    assert traffic.tags == {"Transcode": 1, "Snapshot": 1, "WorkflowFinish": 1}
    assert traffic.states == {"Failed": 1, "Success": 2}
    hour = datetime.fromtimestamp(earlier.timestamp() // 3600 * 3600, timezone.utc)
    hourly = await inbox.traffic(minute - timedelta(hours=24), step=3600)
    assert sum(count for _, _, count in hourly.callbacks) == 5
    assert hourly.callbacks[0][0] == hour
    assert (await inbox.traffic(minute + timedelta(minutes=1))).callbacks == []


async def test_an_event_its_body_no_longer_yields_keeps_what_its_row_holds(inbox):
    # Events are rebuilt from their bodies; one that a newer normalizer would no longer
    # find in its body (here: stored with another callback's body) is still read, claimed
    # and loaded, with the fields its row keeps (and the body's format).
    (other,) = events_of(receipt(load("transcode.xml")))
    arrived = receipt(load("snapshot.xml"))
    await inbox.store(arrived, [(other, ["a"])])
    (claim,) = await inbox.claim("a", 10, 30)
    (loaded,) = await inbox.load([other.id])
    for event in ((await inbox.event(other.id)).event, claim.event, loaded):
        assert (event.id, event.kind, event.job_id, event.tag, event.state) == (
            other.id, other.kind, other.job_id, other.tag, other.state
        )  # fmt: skip
        assert (event.input.bucket, event.input.key) == (other.input.bucket, other.input.key)
        assert (event.received_at, event.source, event.raw) == (arrived.received_at, "http", {})
        assert event.format == "xml"


async def test_load_gives_the_stored_events(inbox):
    arrived = receipt(load("two_jobs.xml"))
    events = events_of(arrived)
    stored = await inbox.store(arrived, [(e, []) for e in events])
    loaded = await inbox.load([*stored.new, "job:none:Success"])
    assert sorted(loaded, key=lambda e: e.id) == sorted(events, key=lambda e: e.id)
    assert await inbox.load([]) == []


async def test_size_grows_with_what_is_stored(inbox):
    before = await inbox.size()
    for n in range(200):
        await store_body(inbox, job(f"jsize{n}"))
    assert await inbox.size() > before


async def test_states_by_prefix_and_deleted(inbox):
    await inbox.set_state("process:a", "1")
    await inbox.set_state("process:b", "2")
    await inbox.set_state("processes", "3")
    await inbox.set_state("other", "4")
    assert await inbox.states("process:") == {"process:a": "1", "process:b": "2"}
    await inbox.delete_state("process:a")
    assert await inbox.states("process") == {"process:b": "2", "processes": "3"}


# --- retention ------------------------------------------------------------------------

DAY = timedelta(days=1)


async def store_at(inbox, body: bytes, days_ago: float, handlers=("a",)):
    arrived = receipt(body)
    arrived.received_at = now() - days_ago * DAY
    return await inbox.store(arrived, [(e, list(handlers)) for e in events_of(arrived)])


async def finish_all(inbox, handler: str, outcome: str) -> None:
    for claim in await inbox.claim(handler, 1000, 30):
        await inbox.finish(claim, outcome, started_at=now())


async def prune_all(inbox, cutoffs, limit: int = 500):
    total = Pruned()
    while pruned := await inbox.prune(cutoffs, limit=limit):
        total += pruned
    return total


async def test_retention_removes_only_what_is_handled_and_old(inbox):
    done_old = await store_at(inbox, job("jdone"), 40, handlers=["a"])
    await finish_all(inbox, "a", "done")
    await store_at(inbox, job("jdup"), 40, handlers=["a"])
    await store_at(inbox, job("jdup"), 39)  # a duplicate's receipt, as old
    await finish_all(inbox, "a", "done")
    await store_at(inbox, job("jdead"), 40, handlers=["d"])
    await finish_all(inbox, "d", "dead")
    pending_old = await store_at(inbox, job("jpending"), 40, handlers=["p"])
    unrouted = await store_at(inbox, job("jnoroute"), 40, handlers=[])
    recent = await store_at(inbox, job("jrecent"), 1, handlers=["a"])
    await finish_all(inbox, "a", "done")
    refused_old = receipt(b"garbage")
    refused_old.received_at = now() - 5 * DAY
    await inbox.reject(refused_old, "not_xml_or_json", "g")
    await inbox.reject(receipt(b"fresh garbage"), "not_xml_or_json", "g")

    cutoffs = Cutoffs(events=now() - 30 * DAY, bodies=now() - 7 * DAY, refused=now() - 3 * DAY)
    planned = await inbox.prunable(cutoffs)
    # jdone, jdup and jnoroute with their receipts, the duplicate of jdup, one refused
    assert (planned.events, planned.receipts) == (3, 5)
    assert planned.bytes > 0
    pruned = await prune_all(inbox, cutoffs, limit=1)  # batch by batch
    assert (pruned.events, pruned.receipts) == (planned.events, planned.receipts)

    left = {e.job_id for e in await inbox.events(limit=100)}
    assert left == {"jdead", "jpending", "jrecent"}
    assert await inbox.event(done_old.new[0]) is None
    assert await inbox.event(unrouted.new[0]) is None
    assert (await inbox.event(recent.new[0])).event.raw  # within every period
    # Pending and dead-lettered work keeps its body: it may still run or be replayed.
    pending = await inbox.event(pending_old.new[0])
    assert pending.event.raw
    assert await run_states(inbox, pending_old.new[0]) == {"p": ("pending", 0)}
    assert [r.error_reason for r in await inbox.receipts(outcome="rejected")] == ["not_xml_or_json"]
    assert len(await inbox.receipts(outcome="rejected")) == 1
    assert await inbox.prunable(cutoffs) == Pruned()


async def test_retention_drops_bodies_of_handled_callbacks_before_their_events(inbox):
    stored = await store_at(inbox, load("transcode.xml"), 10, handlers=["a"])
    held_back = await store_at(inbox, job("jwaiting"), 10, handlers=["slow"])
    await finish_all(inbox, "a", "done")
    whole = (await inbox.event(stored.new[0])).event
    cutoffs = Cutoffs(events=now() - 30 * DAY, bodies=now() - 7 * DAY, refused=None)
    pruned = await prune_all(inbox, cutoffs)
    assert (pruned.events, pruned.receipts, pruned.bodies) == (0, 0, 1)
    assert pruned.bytes == len(pack(load("transcode.xml")))  # the body as it was kept
    detail = await inbox.event(stored.new[0])
    # The event stays whole but for its document, which is gone with the body.
    assert whole.raw
    assert detail.event == dataclasses.replace(whole, raw={}, operation=None)
    assert (await inbox.receipt(stored.receipt_id)).body == b""
    assert (await inbox.event(held_back.new[0])).event.raw


async def test_a_pruned_event_arriving_again_is_new(inbox):
    await store_at(inbox, job("jagain"), 40, handlers=["a"])
    await finish_all(inbox, "a", "done")
    await prune_all(inbox, Cutoffs(events=now() - 30 * DAY, bodies=None, refused=None))
    assert (await store_body(inbox, job("jagain"))).new == ["job:jagain:Success"]


async def test_attempts_keep_counting_across_a_replay_which_is_marked(inbox):
    (event_id,) = (await store_body(inbox, job("jagain"))).new
    (claim,) = await inbox.claim("a", 1, 30)
    await inbox.finish(claim, "released", started_at=now(), error="interrupted")
    (claim,) = await inbox.claim("a", 1, 30)
    await inbox.finish(claim, "retry", started_at=now(), error="e1", retry_at=now())
    (claim,) = await inbox.claim("a", 1, 30)
    await inbox.finish(claim, "done", started_at=now())
    # A replay: the run counts from 0 again.
    assert await inbox.requeue([event_id], None, dead_only=False) == 1
    (claim,) = await inbox.claim("a", 1, 30)
    assert claim.attempts == 0  # what max_attempts measures
    await inbox.finish(claim, "done", started_at=now())
    attempts = (await inbox.event(event_id)).attempts
    assert [(a.number, a.outcome, a.replayed) for a in attempts] == [
        (0, "released", False),
        (1, "retry", False),
        (2, "done", False),
        (3, "done", True),
    ]


async def test_a_run_being_run_says_by_which_process_since_when(inbox):
    (event_id,) = (await store_body(inbox, job("jrunning"))).new
    before = now()
    (claim,) = await inbox.claim("a", 1, 30)
    (run,) = (await inbox.event(event_id)).runs
    assert (run.status, run.leased_by) == ("pending", process_of(claim.lease_token))
    assert run.leased_by == process_of(new_id())  # this process's
    assert before - timedelta(seconds=1) <= run.leased_since <= now()
    await inbox.finish(claim, "retry", started_at=now(), error="e", retry_at=now())
    (run,) = (await inbox.event(event_id)).runs
    assert (run.leased_by, run.leased_since) == (None, None)
