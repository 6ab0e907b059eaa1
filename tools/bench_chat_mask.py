"""What ``--loss-on assistant`` costs in a cache: bytes per stored and per trained position of a chat
corpus built with ``--loss-on assistant`` and ``--loss-on all`` (a tiny random teacher on the CPU).

The prompt positions of chat rows keep their target rows (one row per position, see
docs/cache-format.md), so both caches store the same positions; the difference is the ``loss_mask``
arrays and what is trained. Prints one line per setting.

    python tools/bench_chat_mask.py [--rows 400] [--classes topk:8] [--max-seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import make_tiny

from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.config import LOSS_ON, BuildConfig
from selkd.cache.info import cache_info


def chat_rows(n: int) -> list[dict[str, object]]:
    """Question/answer rows of varied length: about half of the tokens are the assistant's."""
    rows: list[dict[str, object]] = []
    for i in range(n):
        q = f"Question {i}: what does os.path.join({i}, 'x') return, and why would " + "a caller " * (i % 7) + "care?"
        a = f"It returns the path '{i}/x', joined with os.sep; " + "the separator is platform specific. " * (1 + i % 3)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--classes", default="topk:8")
    parser.add_argument("--max-seq-len", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_chat_mask_") as tmp:
        measure(Path(tmp), args)


def measure(root: Path, args: argparse.Namespace) -> None:
    tok = make_tiny.train_bpe_tokenizer(make_tiny.stdlib_texts(max_bytes=400_000), 384, out_dir=root / "teacher")
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id}
    make_tiny.make_llama(len(tok), **ids).save_pretrained(root / "teacher")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(args.rows)))
    for loss_on in LOSS_ON:
        out = root / loss_on
        cfg = BuildConfig(
            teacher=str(root / "teacher"),
            data=[str(data)],
            out=str(out),
            classes=args.classes,
            max_seq_len=args.max_seq_len,
            part_tokens=8192,
            loss_on=loss_on,
            progress=False,
            device="cpu",
        )
        build_cache(cfg)
        info = cache_info(open_cache(str(out)))
        mask = sum(f.stat().st_size for f in out.glob("parts/*/loss_mask/**/*") if f.is_file())
        print(
            f"--loss-on {loss_on}: {info.positions_stored:,} positions stored, {info.positions_trained:,} trained, "
            f"{info.sequences_skipped} sequences skipped; {info.bytes_on_disk:,} B = "
            f"{info.bytes_on_disk / info.positions_stored:.1f} B per stored position, "
            f"{info.bytes_on_disk / max(info.positions_trained, 1):.1f} B per trained position; loss_mask arrays "
            f"{mask:,} B ({mask / info.positions_stored:.2f} B per position)"
        )


if __name__ == "__main__":
    main()
