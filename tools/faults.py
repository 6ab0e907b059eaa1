#!/usr/bin/env python
"""Fault injection: kill -9 a cache builder or a trainer at a chosen point, rerun, compare.

    python tools/faults.py list
    python tools/faults.py cache --work DIR [--point NAME ...] -- BUILD OPTIONS (without --out)
    python tools/faults.py train --work DIR [--point NAME ...] -- TRAIN OPTIONS (without --out)

``cache`` builds an uninterrupted reference into ``DIR/reference``, then for each kill point builds
into ``DIR/<point>`` in a child process that is killed with SIGKILL at that point, reruns the same
build command, runs ``selkd-cache verify`` and compares every commit record's array checksums with
the reference's. ``train`` does the same for ``selkd-train`` (pass ``--save-every N`` so that there
are checkpoints to kill around) and compares the per-step losses in ``metrics.jsonl``. A table of
results is printed; the exit code is 0 only if every point passed.

No hooks in the library: the killed run is a child process that monkeypatches one library function
(``PartWriter.add``, ``writer.write_array``, ``Storage.write_json`` for a given key,
``checkpoint.save_checkpoint`` / ``checkpoint_layout.save_weights`` / ``checkpoint.write_json``) so that it calls
``os.kill(os.getpid(), SIGKILL)`` at the chosen point, and then runs the ordinary command
(``selkd.cache.cli.main`` / ``selkd.trainer.cli.main``). Children come from a multiprocessing
*forkserver* that imports selkd once, so each one starts in milliseconds and inherits no threads.
The rerun is the ordinary command, unpatched. The tests (``tests/faults/``) use the same functions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NoReturn

# The child exits with this code when its command finished without reaching the kill point.
NOT_REACHED = 3
KILLED = -signal.SIGKILL


def die() -> NoReturn:
    """kill -9 this process, now (nothing is flushed, closed or cleaned up, as with a real kill)."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(KILLED)  # pragma: no cover - not reached


class _Nth:
    """Counts events (thread-safe enough: the GIL serialises ``+= 1`` on one int per bytecode pair,
    and kill points fire once)."""

    def __init__(self, nth: int) -> None:
        self.nth, self.seen = nth, 0

    def __call__(self) -> bool:
        self.seen += 1
        return self.seen == self.nth


# --------------------------------------------------------------------------- kill points


def _patch_write_json(match: Callable[[str, Any], bool], nth: int, after: bool) -> None:
    """Kill at the ``nth`` ``Storage.write_json`` whose (key, obj) ``match``es: before or after it is written."""
    from selkd.cache.store import Storage

    original = Storage.write_json
    hit = _Nth(nth)

    def write_json(self: Storage, key: str, obj: Any) -> None:
        fire = match(key, obj) and hit()
        if fire and not after:
            die()
        original(self, key, obj)
        if fire:
            die()

    Storage.write_json = write_json  # type: ignore[method-assign]


def _kill_after_plan(nth: int) -> None:
    from selkd.cache import format as fmt

    _patch_write_json(lambda key, _obj: key == fmt.PLAN_KEY, nth, after=True)


def _kill_scoring(nth: int) -> None:
    from selkd.cache import format as fmt

    _patch_write_json(lambda key, _obj: key.startswith(fmt.SCORE_COMMITS_PREFIX + "/"), nth, after=False)


def _kill_mid_part(nth: int) -> None:
    from selkd.cache.writer import PartWriter

    original = PartWriter.add
    hit = _Nth(nth)

    def add(self: PartWriter, *args: Any, **kwargs: Any) -> None:
        if hit():
            die()
        original(self, *args, **kwargs)

    PartWriter.add = add  # type: ignore[method-assign]


def _kill_mid_write(nth: int) -> None:
    from selkd.cache import writer
    from selkd.cache.format import PARTS_GROUP

    original = writer.write_array
    hit = _Nth(nth)

    def write_array(storage: Any, path: str, values: Any) -> None:
        original(storage, path, values)
        if path.startswith(f"{PARTS_GROUP}/") and hit():  # part arrays only: not token shards, not scores
            die()

    writer.write_array = write_array  # type: ignore[assignment]


def _kill_before_commit(nth: int) -> None:
    from selkd.cache import format as fmt

    _patch_write_json(lambda key, _obj: key.startswith(fmt.COMMITS_PREFIX + "/"), nth, after=False)


def _kill_after_commit(nth: int) -> None:
    from selkd.cache import format as fmt

    _patch_write_json(lambda key, _obj: key.startswith(fmt.COMMITS_PREFIX + "/"), nth, after=True)


def _kill_finalize(nth: int) -> None:
    from selkd.cache import format as fmt

    def is_summary(key: str, obj: Any) -> bool:
        return key == "zarr.json" and fmt.SUMMARY_ATTR in (obj.get("attributes") or {})

    _patch_write_json(is_summary, nth, after=False)


def _kill_between_checkpoints(nth: int) -> None:
    from selkd.trainer import checkpoint

    original = checkpoint.save_checkpoint
    hit = _Nth(nth)

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        if hit():
            die()
        return original(*args, **kwargs)

    checkpoint.save_checkpoint = save_checkpoint  # type: ignore[assignment]


def _kill_checkpoint_weights(nth: int) -> None:
    from selkd.trainer import checkpoint_layout

    original = checkpoint_layout.save_weights
    hit = _Nth(nth)

    def save_weights(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        if hit():
            die()

    checkpoint_layout.save_weights = save_weights  # type: ignore[assignment]


def _kill_checkpoint_complete(nth: int) -> None:
    from selkd.trainer import checkpoint

    original = checkpoint.write_json
    hit = _Nth(nth)

    def write_json(path: Path, obj: Any) -> None:
        original(path, obj)
        if Path(path).name == checkpoint.COMPLETE and hit():
            die()

    checkpoint.write_json = write_json  # type: ignore[assignment]


@dataclass(frozen=True)
class KillPoint:
    name: str
    kind: str  # "cache" or "train"
    nth: int  # default: the nth matching event is where the process dies
    what: str
    install: Callable[[int], None]


KILL_POINTS: dict[str, KillPoint] = {
    p.name: p
    for p in (
        KillPoint("plan", "cache", 1, "right after the part plan (selkd/plan.json) is written", _kill_after_plan),
        KillPoint(
            "scoring",
            "cache",
            2,
            "during sample scoring: a score part's arrays written, its commit record not (needs --sample-ratio)",
            _kill_scoring,
        ),
        KillPoint(
            "mid-part",
            "cache",
            4,
            "in the teacher pass, before the nth batch (counted over all parts) is added to its part",
            _kill_mid_part,
        ),
        KillPoint(
            "mid-write",
            "cache",
            13,
            "while a part's arrays are written: after the nth array (counted over all parts)",
            _kill_mid_write,
        ),
        KillPoint(
            "before-commit",
            "cache",
            2,
            "between write and commit: the nth part's arrays written, its commit record not",
            _kill_before_commit,
        ),
        KillPoint(
            "after-commit",
            "cache",
            2,
            "right after the nth commit record, before the part's lease is released",
            _kill_after_commit,
        ),
        KillPoint(
            "finalize", "cache", 1, "during finalize: every part committed, the root summary not", _kill_finalize
        ),
        KillPoint(
            "between-checkpoints",
            "train",
            2,
            "training, after the steps that follow a checkpoint, just before the nth checkpoint",
            _kill_between_checkpoints,
        ),
        KillPoint(
            "checkpoint-weights",
            "train",
            2,
            "while the nth checkpoint is written: its weights written, the rest not",
            _kill_checkpoint_weights,
        ),
        KillPoint(
            "checkpoint-complete",
            "train",
            2,
            "the nth checkpoint's COMPLETE marker written, the directory not yet renamed into place",
            _kill_checkpoint_complete,
        ),
    )
}


# --------------------------------------------------------------------------- other child behaviours


def _trace_commits(path: str) -> None:
    """Append ``<commit key> <pid>`` to ``path`` for every part commit record this process writes."""
    from selkd.cache import format as fmt
    from selkd.cache.store import Storage

    original = Storage.write_json

    def write_json(self: Storage, key: str, obj: Any) -> None:
        original(self, key, obj)
        if key.startswith(fmt.COMMITS_PREFIX + "/") or key.startswith(fmt.SCORE_COMMITS_PREFIX + "/"):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{key} {os.getpid()}\n".encode())
            finally:
                os.close(fd)

    Storage.write_json = write_json  # type: ignore[method-assign]


def _slow_adds(delay_s: float) -> None:
    """Make every ``PartWriter.add`` take ``delay_s`` longer (so that concurrent builders overlap)."""
    from selkd.cache.writer import PartWriter

    original = PartWriter.add

    def add(self: PartWriter, *args: Any, **kwargs: Any) -> None:
        time.sleep(delay_s)
        original(self, *args, **kwargs)

    PartWriter.add = add  # type: ignore[method-assign]


def _child(
    kind: str,
    argv: list[str],
    point: str | None,
    nth: int | None,
    log_path: str | None,
    trace_path: str | None,
    delay_s: float,
    env: dict[str, str] | None,
) -> None:
    """The body of a child process: patch, then run the ordinary command."""
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if env:
        os.environ.update(env)
    if point is not None:
        kp = KILL_POINTS[point]
        kp.install(kp.nth if nth is None else nth)
    if trace_path:
        _trace_commits(trace_path)
    if delay_s > 0:
        _slow_adds(delay_s)
    if kind == "cache":
        from selkd.cache.cli import main
    else:
        from selkd.trainer.cli import main
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(NOT_REACHED if point is not None and code == 0 else code)


_PRELOAD = ["selkd.cache.cli", "selkd.trainer.cli"]


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # only has an effect before the server starts
    return ctx


def start_child(
    kind: str,
    argv: Sequence[str],
    *,
    point: str | None = None,
    nth: int | None = None,
    log: str | os.PathLike[str] | None = None,
    trace: str | os.PathLike[str] | None = None,
    delay_s: float = 0.0,
    env: Mapping[str, str] | None = None,
) -> BaseProcess:
    """Start ``selkd-cache`` (kind "cache") or ``selkd-train`` (kind "train") with ``argv`` in a child
    process, killed at kill point ``point`` (its ``nth`` event; None: the point's default) if given.
    ``log``: the child's stdout and stderr go there (append). ``env``: variables set in the child
    (the forkserver's environment is the one it started with, not the caller's current one)."""
    if point is not None and (point not in KILL_POINTS or KILL_POINTS[point].kind != kind):
        valid = ", ".join(n for n, p in KILL_POINTS.items() if p.kind == kind)
        raise ValueError(f"unknown {kind} kill point {point!r}; choose one of: {valid}")
    proc = _context().Process(
        target=_child,
        args=(
            kind,
            list(argv),
            point,
            nth,
            None if log is None else str(log),
            None if trace is None else str(trace),
            delay_s,
            dict(env) if env else None,
        ),
        name=f"selkd-{kind}-{point or 'child'}",
    )
    proc.start()
    return proc


def wait_child(proc: BaseProcess, timeout_s: float = 600.0) -> int:
    """The child's exit code (-9: killed by SIGKILL; NOT_REACHED: finished without reaching its kill point)."""
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        raise TimeoutError(f"{proc.name} did not finish in {timeout_s:.0f} s")
    assert proc.exitcode is not None
    return proc.exitcode


def run_child(kind: str, argv: Sequence[str], timeout_s: float = 600.0, **kwargs: Any) -> int:
    """:func:`start_child` and :func:`wait_child` in one."""
    return wait_child(start_child(kind, argv, **kwargs), timeout_s)


# --------------------------------------------------------------------------- comparisons


def cache_digest(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every committed part's and score part's array checksums (from the commit records): equal digests
    mean equal caches. Works on any store (local directory, s3://...)."""
    from selkd.cache import format as fmt
    from selkd.cache.store import Storage

    storage = Storage.open(str(location), storage_options or None, mode="r")
    out = {}
    for prefix in (fmt.COMMITS_PREFIX, fmt.SCORE_COMMITS_PREFIX):
        for name in storage.list_dir(prefix):
            rec = storage.read_json(f"{prefix}/{name}")
            out[rec["part"]] = json.dumps(rec["arrays"], sort_keys=True)
    return out


def train_losses(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The training rows (not evaluation rows) of ``OUT/metrics.jsonl``: step, loss, kd, ce."""
    rows = []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("eval"):
            rows.append({k: row[k] for k in ("step", "loss", "kd", "ce")})
    return rows


def leftovers(out: Path) -> list[str]:
    """What a kill left behind that is not part of a finished result (for the report)."""
    found = []
    commits = out / "selkd" / "commits"
    for group, records in (("parts", commits), ("scores", out / "selkd" / "score-commits")):
        if (out / group).is_dir():
            done = {p.stem for p in records.glob("*.json")} if records.is_dir() else set()
            found += [
                f"uncommitted {p.name}" for p in sorted((out / group).iterdir()) if p.is_dir() and p.name not in done
            ]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += [f"half-written {p.name}" for p in sorted(ckpts.iterdir()) if ".tmp-" in p.name]
    return found


# --------------------------------------------------------------------------- the command line


def _cache_campaign(work: Path, points: list[str], nth: int | None, build: list[str]) -> list[tuple[str, bool, str]]:
    from selkd.cache.cli import main as cache_main

    ref = work / "reference"
    if cache_main(["build", *build, "--out", str(ref)]) != 0:
        raise SystemExit("the reference build failed; fix the options first")
    want = cache_digest(ref)
    results = []
    for point in points:
        out = work / point
        code = run_child("cache", ["build", *build, "--out", str(out)], point=point, nth=nth, log=work / f"{point}.log")
        if code != KILLED:
            why = "kill point not reached" if code == NOT_REACHED else f"child exited with {code}"
            results.append((point, False, why))
            continue
        left = leftovers(out)
        rerun = cache_main(["build", *build, "--out", str(out)])
        verified = cache_main(["verify", str(out)]) if rerun == 0 else 1
        same = rerun == 0 and cache_digest(out) == want
        note = f"left {', '.join(left) or 'nothing half-written'}; rerun exit {rerun}, verify exit {verified}"
        results.append((point, rerun == 0 and verified == 0 and same, note + ("" if same else "; DIFFERS")))
    return results


def _train_campaign(work: Path, points: list[str], nth: int | None, train: list[str]) -> list[tuple[str, bool, str]]:
    from selkd.trainer.cli import main as train_main

    ref = work / "reference"
    if train_main([*train, "--out", str(ref)]) != 0:
        raise SystemExit("the reference run failed; fix the options first")
    want = train_losses(ref)
    results = []
    for point in points:
        out = work / point
        code = run_child("train", [*train, "--out", str(out)], point=point, nth=nth, log=work / f"{point}.log")
        if code != KILLED:
            why = "kill point not reached (pass --save-every)" if code == NOT_REACHED else f"child exited with {code}"
            results.append((point, False, why))
            continue
        left = leftovers(out)
        rerun = train_main([*train, "--out", str(out)])
        same = rerun == 0 and train_losses(out) == want
        note = f"left {', '.join(left) or 'no half-written checkpoint'}; rerun exit {rerun}"
        results.append((point, same, note + ("; losses equal" if same else "; LOSSES DIFFER")))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="faults.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the kill points")
    for kind in ("cache", "train"):
        q = sub.add_parser(kind, help=f"kill -9 `selkd-{'cache build' if kind == 'cache' else 'train'}` and rerun")
        q.add_argument("--work", required=True, type=Path, help="an empty directory for the runs")
        q.add_argument("--point", action="append", help="kill point (repeatable; default: all of this kind)")
        q.add_argument("--nth", type=int, help="die at the nth matching event instead of the point's default")
    args = parser.parse_args(argv)
    if args.command == "list":
        for p in KILL_POINTS.values():
            print(f"{p.kind:6} {p.name:20} (n={p.nth}) {p.what}")
        return 0
    if any(a == "--out" or a.startswith("--out=") for a in rest):
        parser.error("leave --out out of the options after --: faults.py chooses one per run")
    points = args.point or [n for n, p in KILL_POINTS.items() if p.kind == args.command]
    wrong = [n for n in points if n not in KILL_POINTS or KILL_POINTS[n].kind != args.command]
    if wrong:
        valid = ", ".join(n for n, p in KILL_POINTS.items() if p.kind == args.command)
        parser.error(f"unknown {args.command} kill point(s) {', '.join(wrong)}; choose from: {valid}")
    args.work.mkdir(parents=True, exist_ok=True)
    campaign = _cache_campaign if args.command == "cache" else _train_campaign
    results = campaign(args.work, points, args.nth, rest)
    width = max(len(p) for p, _, _ in results)
    for point, ok, note in results:
        print(f"{'PASS' if ok else 'FAIL'}  {point:{width}}  {note}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
