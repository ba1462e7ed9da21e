"""Microseconds per callback through parse_callback, next to a bare parse of the same bytes.

    python -m bench.parse [--quick]

First, for every XML fixture: xmltodict.parse against xmltodict_rs.parse, both bare, and
the receiver's two roads to the same dict: the guarded xmltodict (the reference, and the
road without the xmltodict-rs wheel) and receiver.callback.xml_fast (xmltodict-rs behind its
checks), with their ratios. Then, for every fixture and for the CI-style JSON rendering of
every XML fixture, the best time of `receiver.parse_callback(body)` against a bare
`xmltodict_rs.parse(body)` or `orjson.loads(body)`, and, for XML, parse_callback with
xmltodict alone. Then how long each hostile body takes to be refused.

Times are CPU time (time.process_time), each the best of interleaved rounds: the machine
is shared, and noise only ever adds time. Ratios are between figures of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import orjson
import xmltodict
import xmltodict_rs

from receiver import PayloadError, parse_callback
from receiver.callback import xml_fast
from receiver.callback.decode import DEFAULT_LIMITS, _xml_to_dict_guarded
from tests.support import hostile_bodies as hostile
from tests.support.callbacks import ALL, XML, ci_json_from_xml, load


def best_us(*calls: Callable[[], object], rounds: int) -> list[float]:
    """Best µs per call of each callable, their rounds interleaved so both see the same machine.

    The minimum is the steadiest estimate on a shared machine: noise only ever adds time.
    """
    timers = [timeit.Timer(call, timer=time.process_time) for call in calls]
    numbers = [timer.autorange()[0] for timer in timers]  # enough calls for >= 0.2 s
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, (timer, number) in enumerate(zip(timers, numbers, strict=True)):
            best[i] = min(best[i], timer.timeit(number) / number * 1e6)
    return best


def rooted(body: bytes) -> bytes:
    if not body.startswith(b"<Response"):  # the workflow sample published without a root
        body = b"<Response>" + body + b"</Response>"
    return body


def bare_parse(body: bytes, fmt: str) -> object:
    """What a receiver with no safety and no normalization would at least have to do."""
    if fmt == "json":
        data = orjson.loads(body)
        if "msgBody" in data:  # a CMQ envelope: the callback inside is parsed too
            return xmltodict_rs.parse(data["msgBody"])
        return data
    return xmltodict_rs.parse(rooted(body))


def parse_callback_xmltodict_only(body: bytes) -> object:
    with xml_fast.reference_only():
        return parse_callback(body)


def fast_road(body: bytes) -> object:
    found = xml_fast.parse(body, DEFAULT_LIMITS.max_depth, DEFAULT_LIMITS.max_elements)
    assert found is not None, "the fast road was not taken"
    return found


def compare_xml_parsers(rounds: int) -> None:
    print(
        f"{'XML parse, µs':<32} {'bytes':>6} {'xmltodict':>9} {'-rs':>6} {'ratio':>6}"
        f" {'guarded':>8} {'fast road':>9} {'ratio':>6}"
    )
    ratios: list[float] = []
    for name in XML:
        body = rooted(load(name))
        assert xmltodict.parse(body) == xmltodict_rs.parse(body) == fast_road(body)[0]
        plain, rust, guarded, fast = best_us(
            lambda b=body: xmltodict.parse(b),
            lambda b=body: xmltodict_rs.parse(b),
            lambda b=body: _xml_to_dict_guarded(b, DEFAULT_LIMITS),
            lambda b=body: fast_road(b),
            rounds=rounds,
        )
        ratios.append(guarded / fast)
        print(
            f"{name:<32} {len(body):>6} {plain:>9.1f} {rust:>6.1f} {plain / rust:>5.1f}x"
            f" {guarded:>8.1f} {fast:>9.1f} {guarded / fast:>5.1f}x"
        )
    print(
        f"fast road against guarded xmltodict: median {statistics.median(ratios):.1f}x"
        f" (min {min(ratios):.1f}x, max {max(ratios):.1f}x)\n"
    )


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

    print(f"python {sys.version.split()[0]}, CPU time, best of {rounds} interleaved rounds\n")
    compare_xml_parsers(rounds)

    print(
        f"{'parse_callback, µs':<40} {'fmt':<4} {'bytes':>6} {'bare':>6} {'full':>6}"
        f" {'overhead':>8} {'xmltodict':>9} {'ratio':>6}"
    )
    overheads: dict[str, list[float]] = {"xml": [], "json": []}
    speedups: list[float] = []
    for label, fmt, body in cases:
        calls: list[Callable[[], object]] = [
            lambda b=body, f=fmt: bare_parse(b, f),
            lambda b=body: parse_callback(b),
        ]
        if fmt == "xml" or b"msgBody" in body:  # the decode as it was: xmltodict alone
            calls.append(lambda b=body: parse_callback_xmltodict_only(b))
        bare_us, full_us, *before = best_us(*calls, rounds=rounds)
        overhead = full_us / bare_us - 1
        overheads[fmt].append(overhead)
        line = (
            f"{label:<40} {fmt:<4} {len(body):>6} {bare_us:>6.1f} {full_us:>6.1f} {overhead:>+8.0%}"
        )
        if before:
            speedups.append(before[0] / full_us)
            line += f" {before[0]:>9.1f} {before[0] / full_us:>5.1f}x"
        print(line)

    print()
    for fmt, values in overheads.items():
        print(
            f"{fmt}: median overhead over the bare parse {statistics.median(values):+.0%}"
            f" (min {min(values):+.0%}, max {max(values):+.0%})"
        )
    print(
        f"xml: parse_callback against it with xmltodict alone: median"
        f" {statistics.median(speedups):.1f}x (min {min(speedups):.1f}x, max {max(speedups):.1f}x)"
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
