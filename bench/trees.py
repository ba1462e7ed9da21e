"""Another revision of the code measured beside this tree, in one run.

A benchmark's `--against REV` exports the revision (`git archive`) with this tree's
`bench/` and `tests/support/` (the senders and stand-ins the benchmarks use) laid over
it, so that both sides run the same measuring code, then runs one
process per tree in interleaved rounds, each with its own tree first on PYTHONPATH, and
keeps each tree's best figure of every key (noise on a shared machine only ever adds
time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def export(revision: str, into: Path, *, own_bench: bool = False) -> Path:
    """The tree of `revision` in the new folder `into`, with this tree's bench/ and
    tests/support/ (the helpers it imports) over it; with `own_bench`, the revision's
    own (a revision whose modules lie elsewhere, before the layout by stage, cannot run
    this tree's measuring code)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(HERE), "archive", revision], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if not own_bench:
        shutil.copytree(HERE / "bench", into / "bench", dirs_exist_ok=True)
        support = HERE / "tests" / "support"
        shutil.copytree(support, into / "tests" / "support", dirs_exist_ok=True)
    return into


def measure(tree: Path, module: str, arguments: list[str]) -> Any:
    """`python -m module arguments` on `tree`'s code: its last line of output, as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{module} on {tree}: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(
    rounds: int, trees: dict[str, Path], module: str, arguments: list[str]
) -> dict[str, Any]:
    """Each tree's lowest figure of every key (figures nested in dicts, as `measure`
    returns them) over `rounds` rounds, the trees taking turns within each."""
    best: dict[str, Any] = {}
    for _ in range(rounds):
        for name, tree in trees.items():
            best[name] = _lowest(best.get(name), measure(tree, module, arguments))
    return best


def _lowest(kept: Any, figures: Any) -> Any:
    if kept is None:
        return figures
    if isinstance(figures, dict):
        return {key: _lowest(kept.get(key), value) for key, value in figures.items()}
    return min(kept, figures)
