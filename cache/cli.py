"""`selkd-cache prepare | build | info | verify | finalize`: parse, call, map errors to messages and exit codes.

Exit codes: 0 success; 1 the command ran and found a problem (verify) or failed at run time;
2 bad usage or configuration. A full disk (ENOSPC, or EDQUOT: over quota) while writing is a
one-line error naming the store, not a traceback: freeing space and rerunning the same command
resumes the build (committed parts are kept; a part being written is invisible until committed).

Start-up: only pure-Python modules are imported before the arguments are parsed, so ``--help``,
``--version`` and a usage error answer at once; each command imports what it needs (torch and
transformers for ``prepare`` and ``build``, zarr and numpy for ``info``, ``verify`` and ``finalize``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from selkd.cache.config import BuildConfig, PrepareConfig
from selkd.cache.errors import Command, run_cli
from selkd.cache.options import OptionParser, add_arguments, add_version, from_args, parse_kv, read_config_file

if TYPE_CHECKING:
    from selkd.cache.reader import CacheReader
    from selkd.cache.tokens import TokenStore

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
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, config, helptext, description in (
        (
            "prepare",
            PrepareConfig,
            "tokenize a corpus into a token store (what build --tokens and selkd-train --tokens read)",
            "Tokenize a corpus into a sharded token store, in parallel and resumably.",
        ),
        (
            "build",
            BuildConfig,
            "run the teacher over a corpus and write a cache",
            "Run the teacher over a corpus and write a sharded Zarr cache.",
        ),
    ):
        p = sub.add_parser(name, help=helptext, description=description)
        add_version(p)
        p.add_argument("--config", metavar="FILE", help="options from a YAML or TOML file (flags override it)")
        add_arguments(p, config)
    for name, helptext in (
        ("info", "show what a cache (or a token store) holds and what it costs"),
        ("verify", "check every committed part (checksums and contents)"),
        ("finalize", "write the root summary once every part is committed"),
    ):
        q = sub.add_parser(name, help=helptext, description=helptext)
        add_version(q)
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
    args = make_parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(from_args(PrepareConfig, args, _file_values(args)), argv, cmd)
    if args.command == "build":
        cfg = from_args(BuildConfig, args, _file_values(args))
        cmd.out = cfg.out
        from selkd.cache.build import build_cache  # torch and transformers: once the options are checked

        return 0 if build_cache(cfg, argv=["selkd-cache", *argv]) is not None else 1
    options = _storage_options(args.storage_option)
    if args.command == "finalize":
        return _finalize(args.store, options, cmd)
    if args.command == "info":
        return _info(args.store, options, args.json)
    return _verify(args.store, options)


def _file_values(args: argparse.Namespace) -> dict[str, object] | None:
    return read_config_file(args.config) if args.config else None


def _prepare(cfg: PrepareConfig, argv: Sequence[str], cmd: Command) -> int:
    from selkd.cache.build import torchrun_rank_world
    from selkd.cache.leases import log
    from selkd.cache.prepare import prepare_tokens
    from selkd.cache.teacher import load_tokenizer

    cmd.out, cmd.disk_full_rerun = cfg.out, DISK_FULL_RERUN_TOKENS
    rank, world = torchrun_rank_world(cfg)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    store = prepare_tokens(cfg, tokenizer, rank, world, argv=["selkd-cache", *argv])
    for warning in store.stats.warnings():
        log(f"warning: {warning}")
    summary = store.summary
    log(
        f"done: {summary['n_tokens']:,} tokens, {summary['n_documents']:,} documents in {len(store.shards)} "
        f"shards -> {store.url}"
    )
    return 0


def _finalize(location: str, options: dict[str, object], cmd: Command) -> int:
    from selkd.cache.header import finalize
    from selkd.cache.store import Storage

    cmd.out = location
    Storage.open(location, options, mode="r")  # must exist: "w" would create it
    print(json.dumps(finalize(Storage.open(location, options, mode="w")), indent=2))
    return 0


def _info(location: str, options: dict[str, object], as_json: bool) -> int:
    from selkd.cache.info import cache_info, info_dict
    from selkd.cache.reader import open_cache

    store = _token_store(location, options)
    if store is not None:
        print(json.dumps(store.summary | {"header": store.header}, indent=2) if as_json else store.describe())
        return 0
    reader = open_cache(location, options, require_complete=False)
    info = cache_info(reader)
    if as_json:
        print(json.dumps({**info_dict(info), "missing_parts": reader.missing_parts}, indent=2))
    else:
        print("\n".join([str(info), *_missing_lines(reader)]))
    return 0


def _verify(location: str, options: dict[str, object]) -> int:
    from tqdm import tqdm

    from selkd.cache.reader import open_cache
    from selkd.cache.verify import verify_cache

    reader = open_cache(location, options, require_complete=False)
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


def _token_store(location: str, options: dict[str, object]) -> TokenStore | None:
    """The token store at ``location`` if it holds one (its root header says so), else None."""
    from selkd.cache.store import Storage
    from selkd.cache.tokens import TokenStore, read_header

    if read_header(Storage.open(location, options, mode="r")) is None:
        return None
    return TokenStore.open(location, options)


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
