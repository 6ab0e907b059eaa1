"""`selkd-cache prepare | build | info | verify | finalize`: parse, call, map errors to messages and exit codes.

Exit codes: 0 success; 1 the command ran and found a problem (verify) or failed at run time;
2 bad usage or configuration. A full disk (ENOSPC, or EDQUOT: over quota) while writing is a
one-line error naming the store, not a traceback: freeing space and rerunning the same command
resumes the build (committed parts are kept; a part being written is invisible until committed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tqdm import tqdm

from selkd.cache.build import build_cache, finalize, torchrun_rank_world
from selkd.cache.config import BuildConfig, PrepareConfig
from selkd.cache.errors import Command, run_cli
from selkd.cache.info import cache_info, info_dict
from selkd.cache.leases import log
from selkd.cache.options import OptionParser, add_arguments, from_args, parse_kv, read_config_file
from selkd.cache.prepare import prepare_tokens
from selkd.cache.reader import CacheReader, open_cache
from selkd.cache.store import Storage
from selkd.cache.teacher import load_tokenizer
from selkd.cache.tokens import TokenStore, read_header
from selkd.cache.verify import verify_cache

# What rerunning a build does with a store whose disk filled up.
DISK_FULL_RERUN = "committed parts are kept, the part that was being written is not visible and is redone"
DISK_FULL_RERUN_TOKENS = "committed units are kept, the units that were being written are redone"
INTERRUPTED = "interrupted; rerun the same command to resume (committed parts are kept)"


def _storage_options(pairs: list[tuple[str, object]] | None) -> dict[str, object]:
    return dict(pairs or [])


def make_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="selkd-cache", description="Build, inspect and verify selkd caches of sparse teacher outputs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into a token store (what build --tokens and selkd-train --tokens read)",
        description="Tokenize a corpus into a sharded token store, in parallel and resumably.",
    )
    p.add_argument("--config", metavar="FILE", help="options from a YAML or TOML file (flags override it)")
    add_arguments(p, PrepareConfig)
    p = sub.add_parser(
        "build",
        help="run the teacher over a corpus and write a cache",
        description="Run the teacher over a corpus and write a sharded Zarr cache.",
    )
    p.add_argument("--config", metavar="FILE", help="options from a YAML or TOML file (flags override it)")
    add_arguments(p, BuildConfig)
    for name, helptext in (
        ("info", "show what a cache (or a token store) holds and what it costs"),
        ("verify", "check every committed part (checksums and contents)"),
        ("finalize", "write the root summary once every part is committed"),
    ):
        q = sub.add_parser(name, help=helptext, description=helptext)
        q.add_argument("store", metavar="STORE", help="the cache: a local directory or an fsspec URL")
        q.add_argument(
            "--storage-option",
            dest="storage_option",
            type=parse_kv,
            action="append",
            metavar="KEY=VALUE",
            help="fsspec storage option, repeatable",
        )
        if name == "info":
            q.add_argument("--json", action="store_true", help="print one JSON object instead of the text view")
    return parser


def run(argv: Sequence[str], cmd: Command) -> int:
    """Parse ``argv`` and run the command; ``cmd.out`` is set to the store it writes (a full disk's
    message names it)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "prepare":
        cfg = from_args(PrepareConfig, args, read_config_file(args.config) if args.config else None)
        cmd.out, cmd.disk_full_rerun = cfg.out, DISK_FULL_RERUN_TOKENS
        store = _prepare(cfg, argv)
        for warning in store.stats.warnings():
            log(f"warning: {warning}")
        summary = store.summary
        log(
            f"done: {summary['n_tokens']:,} tokens, {summary['n_documents']:,} documents in {len(store.shards)} "
            f"shards -> {store.url}"
        )
        return 0
    if args.command == "build":
        file_values = read_config_file(args.config) if args.config else None
        cfg = from_args(BuildConfig, args, file_values)
        cmd.out = cfg.out
        result = build_cache(cfg, argv=["selkd-cache", *argv])
        return 0 if result is not None else 1
    options = _storage_options(args.storage_option)
    if args.command == "finalize":
        cmd.out = args.store
        Storage.open(args.store, options, mode="r")  # must exist: "w" would create it
        summary = finalize(Storage.open(args.store, options, mode="w"))
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "info" and _is_token_store(args.store, options):
        store = TokenStore.open(args.store, options)
        print(json.dumps(store.summary | {"header": store.header}, indent=2) if args.json else store.describe())
        return 0
    reader = open_cache(args.store, options, require_complete=False)
    if args.command == "info":
        info = cache_info(reader)
        missing = _missing_lines(reader)
        if args.json:
            print(json.dumps({**info_dict(info), "missing_parts": reader.missing_parts}, indent=2))
        else:
            print("\n".join([str(info), *missing]))
        return 0
    bar = tqdm(total=len(reader.parts), unit="part", desc="verify", file=sys.stderr, dynamic_ncols=True)
    problems = verify_cache(reader, progress=lambda _name: bar.update(1))
    bar.close()
    for line in _missing_lines(reader):
        print(f"note: {line}", file=sys.stderr)
    for problem in problems:
        print(f"selkd-cache verify: {reader.url}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(reader.parts)} parts verified in {reader.url}")
    return 0


def _prepare(cfg: PrepareConfig, argv: Sequence[str]) -> TokenStore:
    rank, world = torchrun_rank_world(cfg)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    return prepare_tokens(cfg, tokenizer, rank, world, argv=["selkd-cache", *argv])


def _is_token_store(location: str, options: dict[str, object]) -> bool:
    """Whether ``location`` holds a token store (its root header says so)."""
    return read_header(Storage.open(location, options, mode="r")) is not None


def _missing_lines(reader: CacheReader, shown: int = 5) -> list[str]:
    """What ``info`` and ``verify`` say about parts that cannot be read."""
    lost = set(reader.lost_parts)
    absent = [p for p in reader.missing_parts if p not in lost]
    lines = []
    if absent:
        more = " ..." if len(absent) > shown else ""
        names = ", ".join(absent[:shown])
        lines.append(f"missing         {len(absent)} planned parts are not committed: {names}{more}")
    if lost:
        names = sorted(lost)
        more = " ..." if len(names) > shown else ""
        lines.append(
            f"missing         {len(names)} committed parts have no arrays (deleted?): {', '.join(names[:shown])}{more}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = Command("selkd-cache", interrupted=INTERRUPTED, disk_full_rerun=DISK_FULL_RERUN)
    return run_cli(cmd, lambda: run(argv, cmd))


if __name__ == "__main__":
    sys.exit(main())
