"""Write docs/cli.md: the option tables come from the config dataclasses, so the guide cannot drift
from the code (tests/test_docs.py fails when docs/cli.md is stale).

    python tools/gen_cli_docs.py            # rewrite docs/cli.md
    python tools/gen_cli_docs.py --check    # exit 1 if docs/cli.md is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from selkd.cache.config import BuildConfig, PrepareConfig
from selkd.cache.options import GROUPS, flag_name, negated_flag, range_text
from selkd.trainer.config import TrainConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def option_row(f: dataclasses.Field[typing.Any], is_bool: bool) -> str:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    shown = "required" if meta["required"] else ("" if default in (None, [], {}) else f"`{default}`")
    extra = []
    if meta["choices"]:
        extra.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    limits = range_text(meta)
    if limits is not None:
        extra.append(f"`{limits}`")
    text = meta["help"].replace("|", "\\|") + (f" ({'; '.join(extra)})" if extra else "")
    if is_bool:
        flags = f"`{flag_name(f.name)}`, `{negated_flag(f.name)}`"
    else:
        flags = f"`{flag_name(f.name)}{' ' + meta['metavar'] if meta['metavar'] else ''}`"
    return f"| {flags} | {shown} | {text} |"


def option_table(config_cls: type) -> str:
    """One table per option group, in the order ``--help`` shows them."""
    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.metadata and f.metadata["cli"]]
    tables = []
    for group in GROUPS:
        rows = [option_row(f, hints[f.name] in (bool, bool | None)) for f in fields if f.metadata["group"] == group]
        if rows:
            tables.append(
                "\n".join([f"**{group} options**", "", "| option | default | meaning |", "|---|---|---|", *rows])
            )
    return "\n\n".join(tables)


TEMPLATE = """# Command-line guide

Three commands: `selkd-cache` tokenizes corpora and builds, inspects and verifies caches of teacher outputs;
`selkd-train` distils a student from a cache (or from a teacher in the loop); `selkd-demo` runs
the whole pipeline on a corpus every machine has. `python -m selkd.cache` and
`python -m selkd.trainer` work like the first two, which is what `torchrun -m` needs.

Every option is declared once, in a config dataclass (`cache/config.py`, `trainer/config.py`), with
its default, help text and range check; the tables below are generated from those dataclasses by
`tools/gen_cli_docs.py`. Options can also come from `--config FILE` (YAML or TOML, keys are option
names with `_` or `-`); flags given on the command line override the file. A yes/no option `--x`
is turned on by `--x` (or `--x true`) and off by `--no-x` (or `--x false`); in a file write
`x: true` / `x: false`. Flags are spelled out in full (`--class` is not `--classes`; an unknown
flag gets the nearest known ones as a hint). Exit codes: 0 success, 1 a run-time problem the message
explains, 2 bad usage or configuration (one line naming the flag or the `--config` file and line).
`--help` shows the options in groups (model, data, classes, selection, optimisation, output,
distributed: the tables below follow the same groups), each with its default and range; `--version`
(on every command and subcommand) prints the command and the package version.

## Data specs

`--data` takes one or more specs, read in the order given (sorted within a directory or glob):

- a `.txt` file (one document), `.jsonl` / `.jsonl.gz` (one row per line; the text in `--text-field`,
  or a chat `messages` list rendered with the tokenizer's chat template), `.parquet`;
- a directory (read recursively, hidden entries skipped) or a glob (quote it: `'corpus/*.jsonl.gz'`);
- the same behind an fsspec URL: `s3://bucket/corpus/`, `s3://bucket/corpus/*.parquet`, `gs://...`
  (credentials and endpoint from `--storage-option` or the AWS environment), streamed, never copied;
- a directory written by `datasets.save_to_disk` (local);
- `datasets:DIR[?name=CONFIG&split=SPLIT&data_dir=SUB&data_files=GLOB]`: a dataset directory (a Hub
  dataset repository downloaded with `huggingface-cli download --repo-type dataset NAME --local-dir
  DIR`, or any directory `datasets.load_dataset` understands) or a packaged builder with local files
  (`datasets:json?data_files=/data/*.jsonl.gz`), streamed by `load_dataset(..., streaming=True)` from
  local files only (nothing is fetched from the Hub).

## selkd-cache prepare

```
selkd-cache prepare --data SPEC [SPEC ...] --tokenizer MODEL --out TOKENS [--workers N] [options]
```

Tokenizes the corpus once into a sharded token store ([token-store.md](token-store.md)): the inputs
are cut into units (a file, a parquet row group, a dataset shard), each tokenized by exactly one
worker, in parallel over ranks (torchrun, or `--rank`/`--world-size`) and `--workers` processes per
rank, and committed one by one. Memory per process is one shard (`--shard-tokens`), whatever the
corpus size. Rerunning the same command resumes (committed units are kept); a rerun with other
settings, or after the data changed, is refused. `selkd-cache build --tokens TOKENS` and
`selkd-train --tokens TOKENS` read it; `selkd-cache info TOKENS` says what it holds.

{prepare}

## selkd-cache build

```
selkd-cache build --teacher MODEL --tokens TOKENS --out STORE [--classes MODE] [options]
selkd-cache build --teacher MODEL --data SPEC [SPEC ...] --out STORE [--classes MODE] [options]
```

Reads the token store (`--tokens`, or `--data` tokenized first into `STORE/tokens`, as `prepare`
would), packs it into sequences, optionally scores every training sequence with a frozen student and
keeps the best `--sample-ratio`, runs the teacher, and writes the sparse targets into parts of a
sharded Zarr store. Every builder derives the eval split and the part plan from the token store's
counts and reads only the sequences of its own parts. Rerunning the same command on the same `--out`
skips committed parts and redoes the rest; a rerun with other settings is refused with the settings
that differ.

{build}

Examples:

```
# RS-KD targets, 50 draws per position, from a local model, to a local directory
selkd-cache build --teacher ./qwen3-8b --data corpus/*.jsonl.gz --out cache/ --classes sample:50

# top-64 with tail mass, only the 20% of sequences the student finds hardest
selkd-cache build --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-1.7B --sample-ratio 0.2 \\
    --data fineweb/ --out s3://bucket/caches/fw-top64 --classes topk:64 \\
    --storage-option endpoint_url=https://s3.example.com
```

## selkd-cache info | verify | finalize

```
selkd-cache info STORE|TOKENS [--json] [--storage-option KEY=VALUE ...]
selkd-cache verify STORE [--storage-option KEY=VALUE ...]
selkd-cache finalize STORE [--storage-option KEY=VALUE ...]
```

`info` reads metadata only and prints what the cache holds and costs (sequences, positions, bytes
per stored and per corpus position (not counting the token store `build --data` keeps in
`STORE/tokens`), the saving against full fp16 logits, mean teacher entropy,
mean unique ids or kept mass, committed and incomplete parts); `--json` prints the same as one
object. `verify` reads every committed part and checks the checksums and the contents (offsets,
ids < vocab, counts summing to N, log-probs <= 0, kept + tail mass = 1); it exits 1 naming the part
and the array at fault. `finalize` writes the root summary once every part is committed (the last
builder does this by itself). `info TOKENS` shows what a token store holds (tokenizer, data, tokens,
documents, shards, data warnings).

## selkd-train

```
selkd-train --cache STORE --student MODEL --out DIR [options]                  # offline: the main mode
selkd-train --teacher MODEL --tokens TOKENS --student MODEL --out DIR         # online teacher, same loop
selkd-train --teacher MODEL --data SPEC [SPEC ...] --student MODEL --out DIR   # (tokenized into OUT/tokens)
```

{train}

Examples:

```
# SE-KD (the default: student entropy, top 20% of each sequence, forward KL)
selkd-train --cache cache/ --student ./qwen3-1.7b --out runs/sekd --lr 1e-5 --epochs 1

# full KD from the same cache, for comparison
selkd-train --cache cache/ --student ./qwen3-1.7b --out runs/full --select none

# SE-KD 3X: positions + sampled classes (a sample:N cache) + the top 20% of samples
selkd-train --cache cache-with-scores/ --student ./qwen3-1.7b --out runs/3x --sample-ratio 0.2

# the no-teacher baseline on the same batches: next-token CE only
selkd-train --cache cache/ --student ./qwen3-1.7b --out runs/ce --kd-weight 0 --ce-weight 1 --select none
```

Which selection to use. The defaults (`--select student-entropy:0.2`, `--select-policy sequence`, no CE
term) are the paper's, measured on a pretrained 1.7B student with an 8B teacher, where SE-KD at 20% beat
full KD. On this project's small CPU models (docs/results.md section 5, the regime map: 0.63M students,
V = 4,096, 100 steps, three of four regimes with the teacher clearly ahead) top-k by student entropy,
with or without the paper's curriculum and global policies, never came within 0.02 nat of full KD and
never beat random 20%; the evidence disagrees, so the defaults stay and you decide on your own held-out
set: use the default when the student is pretrained and close to a clearly stronger teacher, the
vocabulary large (an SE-KD step then costs about half a full-KD step) and the run long, after checking
it beats `--select random:0.2` over a few hundred steps; use `--select none` when the student is small or
far from its teacher, the run short or the vocabulary small; `--select random:0.2` given the steps its
cheaper step buys beat full KD wherever the teacher was ahead; `--select-policy stochastic`
(Hansen-Hurwitz weights, an exactly unbiased estimate of full KD) tied full KD at equal wall time in
every regime; the hybrid `student-entropy:0.15+random:0.05` keeps some uniform coverage and recovers most
of top-k's gap; add `--ce-weight 1` to a selection when the student is near its plateau (it costs a head
pass over every position: more than a full-KD step at V = 4,096); and skip KD when the teacher is not
clearly better than the student on held-out CE.

Rerunning the same command with the same `--out` resumes from the last complete checkpoint
(`--resume` insists on one). `--steps` may be raised on a rerun to train longer; any other change
against the checkpoint's config is refused, naming the keys.

`--out` must be a new or empty directory or an earlier run (it holds `selkd-run.json`); a directory
with other files in it, or one that is, contains or lies inside an input (`--student`, `--teacher`,
`--data`, a local `--cache` or `--tokens`), is refused before anything is written. A run that fails before its
first complete checkpoint removes what it created. A finished run keeps `OUT/final` (a Hugging Face
model directory) and the newest `--keep-checkpoints` checkpoints (each about 3x the fp32 model: the
optimizer state is in it); its last log line says what is kept, where, and how large.

Evaluation (`metrics.jsonl` rows with `"eval": true`, every `--eval-every` steps and at the end)
reports `eval_ce` and `eval_ppl` on the true next tokens, `eval_top1_agree` with the teacher's most
likely class (on `sample:N` targets: its most drawn class), and the divergences named for what they
are: `eval_kl`, the forward KL(teacher || student), exact on `full` targets and, on `sample:N`
targets, the unbiased estimate from the draws and the teacher entropy the cache stores (a perfect
student reads about 0); on `topk:K` targets `eval_kl_bound`, the KL over the K classes and the tail,
a lower bound of the full KL. With `--loss rkl` or `jsd` the training divergence is reported too
(`eval_rkl`, `eval_jsd`, with `_bound` on top-k targets; `_topk_renormalized` with
`--topk-renormalize`). On `sample:N` targets built at a temperature other than 1 the stored entropy
does not apply and the metric is the cross-entropy, `eval_kl_plus_teacher_entropy`.

## GPU-cluster recipe

1. **Tokenize the corpus once** (CPU nodes will do; every rank takes its share of the input units and
   runs `--workers` tokenizer processes; memory per process stays at one shard):

   ```
   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
       -m selkd.cache prepare --data s3://bucket/corpus/ --tokenizer Qwen/Qwen3-8B \\
       --out s3://bucket/tokens/corpus-qwen3 --workers 4
   ```

   Rank 0 writes the summary once every unit is committed; a killed preparer is resumed by
   rerunning the same command. `selkd-cache info s3://bucket/tokens/corpus-qwen3` says what it holds.
2. **Build the cache on teacher nodes** (one builder per GPU; parts are split disjointly by rank;
   each part is written by exactly one process, so builders never touch the same object):

   ```
   torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
       -m selkd.cache build --teacher Qwen/Qwen3-8B --tokens s3://bucket/tokens/corpus-qwen3 \\
       --out s3://bucket/caches/qwen3-8b-s50 --classes sample:50 --batch-size 16
   ```

   Every rank derives the same eval split and plan from the token store's counts and reads only the
   sequences of its own parts; rank r writes parts r, r + W, ...; the last rank to finish writes the
   root summary (or run `selkd-cache finalize`). A killed builder is resumed by rerunning the same
   command: committed parts are skipped. (`--data` instead of `--tokens` tokenizes into
   `STORE/tokens` first, split over the builders the same way.)

   **A teacher larger than one GPU** (Qwen3-235B-A22B, 470 GB in bf16, with the token store's
   tokenizer): run **one builder per node** with `--teacher-device-map auto` (needs
   `pip install 'selkd[multigpu]'`, i.e. accelerate): its layers are spread over the node's GPUs, the
   token ids go to the first layer's GPU and the class selection runs on the GPU that holds the LM
   head. A teacher that fits one GPU is faster as one builder per GPU without a map (every GPU works
   at once instead of in turn):

   ```
   torchrun --nnodes 4 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
       -m selkd.cache build --teacher Qwen/Qwen3-235B-A22B --teacher-device-map auto \\
       --tokens s3://bucket/tokens/corpus-qwen3 --out s3://bucket/caches/qwen3-235b-s50 --classes sample:50
   ```

   `balanced_low_0` keeps GPU 0 light, and a JSON object (`'{{"model.embed_tokens": 0, ...,
   "lm_head": 7}}'`) places modules by hand (`"cpu"` and `"disk"` offload them; disk offload goes to a
   temporary folder, never into the model's directory). Online training takes the same
   `--teacher-device-map`. The teacher's LM head always runs `--head-chunk-tokens` positions at a time
   into one reused buffer, so long sequences do not need the `[B, L, V]` logits (bf16 at B = 8,
   L = 4,096, V = 151,936: 10 GB) on any GPU.
3. **Check it**: `selkd-cache info s3://bucket/caches/qwen3-8b-s50` and `selkd-cache verify ...`.
4. **Train on student nodes** (DDP; `--fsdp` shards students that do not fit one GPU; rank 0 logs
   and writes checkpoints to `--out`, which must be on storage rank 0 can write; with `--fsdp` every
   rank writes its own shard of each checkpoint, so `--out` must be on storage every node shares):

   ```
   torchrun --nnodes 2 --nproc-per-node 8 ... -m selkd.trainer --cache s3://bucket/caches/qwen3-8b-s50 \\
       --student Qwen/Qwen3-1.7B --out /shared/runs/sekd --batch-size 4 --grad-accum 4 --lr 1e-5
   ```

   Online distillation reads the same token store: `--teacher Qwen/Qwen3-8B --tokens
   s3://bucket/tokens/corpus-qwen3` instead of `--cache` (with `--data`, every rank tokenizes its share
   into `OUT/tokens`, so `--out` must then be on storage every rank can reach).
5. **Resume** after a preemption by rerunning the same command.

S3 credentials and the endpoint come from `--storage-option key=... secret=... endpoint_url=...` or
from the usual AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, ...), as s3fs reads them.
"""


def render() -> str:
    return TEMPLATE.format(
        prepare=option_table(PrepareConfig), build=option_table(BuildConfig), train=option_table(TrainConfig)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
