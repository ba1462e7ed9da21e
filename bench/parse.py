"""Microseconds per callback through parse_callback, next to a bare parse of the same bytes.

    python -m bench.parse [--quick]

For every fixture, and for the CI-style JSON rendering of every XML fixture, prints the
best time of `receiver.parse_callback(body)` and of a bare `xmltodict.parse(body)` or
`orjson.loads(body)`, measured in the same run, and the overhead of decoding safely and
normalizing over that bare parse. Then how long each hostile body takes to be refused.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import timeit
from collections.abc import Callable

import orjson
import xmltodict

from receiver import PayloadError, parse_callback
from tests import test_hostile_bodies as hostile
from tests.callbacks import ALL, ci_json_from_xml, load


def best_us(*calls: Callable[[], object], rounds: int) -> list[float]:
    """Best µs per call of each callable, their rounds interleaved so both see the same machine.

    The minimum is the steadiest estimate on a shared machine: noise only ever adds time.
    """
    timers = [timeit.Timer(call) for call in calls]
    numbers = [timer.autorange()[0] for timer in timers]  # enough calls for >= 0.2 s
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, (timer, number) in enumerate(zip(timers, numbers, strict=True)):
            best[i] = min(best[i], timer.timeit(number) / number * 1e6)
    return best


def bare_parse(body: bytes, fmt: str) -> object:
    """What a receiver with no safety and no normalization would at least have to do."""
    if fmt == "json":
        data = orjson.loads(body)
        if "msgBody" in data:  # a CMQ envelope: the callback inside is parsed too
            return xmltodict.parse(data["msgBody"])
        return data
    if not body.startswith(b"<Response"):  # the workflow sample published without a root
        body = b"<Response>" + body + b"</Response>"
    return xmltodict.parse(body)


def refused(body: bytes) -> Callable[[], object]:
    def call() -> None:
        with contextlib.suppress(PayloadError):
            parse_callback(body)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    rounds = 3 if parser.parse_args().quick else 7

    cases: list[tuple[str, str, bytes]] = []
    for name in ALL:
        body = load(name)
        if name.endswith(".xml"):
            cases.append((name, "xml", body))
            cases.append((name + " as JSON", "json", ci_json_from_xml(body)))
        else:
            cases.append((name, "json", body))

    print(f"python {sys.version.split()[0]}, best of {rounds} interleaved rounds\n")
    print(f"{'callback':<44} {'fmt':<4} {'bytes':>6} {'bare µs':>8} {'full µs':>8} {'overhead':>9}")
    overheads: dict[str, list[float]] = {"xml": [], "json": []}
    for label, fmt, body in cases:
        bare_us, full_us = best_us(
            lambda b=body, f=fmt: bare_parse(b, f), lambda b=body: parse_callback(b), rounds=rounds
        )
        overhead = full_us / bare_us - 1
        overheads[fmt].append(overhead)
        print(
            f"{label:<44} {fmt:<4} {len(body):>6} {bare_us:>8.1f} {full_us:>8.1f} {overhead:>+9.0%}"
        )

    print()
    for fmt, values in overheads.items():
        print(
            f"{fmt}: median overhead {statistics.median(values):+.0%}"
            f" (min {min(values):+.0%}, max {max(values):+.0%})"
        )

    print(f"\n{'hostile body (<= 1 MiB)':<32} {'reason':<20} {'ms to refuse':>12}")
    for name in (
        "BILLION_LAUGHS",
        "EXTERNAL_ENTITY",
        "QUADRATIC_BLOWUP",
        "DEEP_XML",
        "WIDE_XML",
        "DEEP_JSON",
        "WIDE_JSON",
    ):
        body = getattr(hostile, name)
        try:
            parse_callback(body)
            reason = "accepted?"
        except PayloadError as error:
            reason = error.reason
        ms = best_us(refused(body), rounds=3)[0] / 1000
        print(f"{name.lower():<32} {reason:<20} {ms:>12.2f}")


if __name__ == "__main__":
    main()
