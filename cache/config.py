"""BuildConfig and PrepareConfig: every option of `selkd-cache build` and `selkd-cache prepare`, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selkd.cache.modes import ClassSpec
from selkd.cache.options import check, opt

SAMPLE_SIGNALS = ("student-entropy", "teacher-entropy", "random")
#: What ``--loss-on`` distils: only the tokens selkd.cache.tokenizing marks trained (a chat row's
#: assistant turns; all of a plain-text document), or every position.
LOSS_ON = ("assistant", "all")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def valid_device_map(text: str) -> str | None:
    """``--teacher-device-map``'s check (build and online training): None, or what is wrong."""
    from selkd.cache.teacher import parse_device_map

    try:
        parse_device_map(text)
    except ValueError as err:
        return str(err)
    return None


def _valid_classes(text: str) -> str | None:
    try:
        ClassSpec.parse(text)
    except ValueError as err:
        return str(err).split(": ", 1)[-1]
    return None


TEACHER_DEVICE_MAP_HELP = (
    "spread the teacher's layers over this node's GPUs with accelerate (a teacher larger than one GPU): auto, "
    "balanced, balanced_low_0, sequential, or a JSON object of module name -> GPU index, cpu or disk; run one "
    "process per node with it (default: the whole teacher on --device)"
)

_DATA_HELP = (
    "corpus: .txt/.jsonl/.jsonl.gz/.parquet files, directories, globs (local or fsspec URLs such as "
    "s3://bucket/corpus/), `datasets` save_to_disk directories, or datasets:DIR[?name=CONFIG&split=SPLIT]"
)


@dataclass
class PrepareConfig:
    """Options of `selkd-cache prepare`: tokenize a corpus into a token store (see selkd.cache.prepare)."""

    data: list[str] = opt(help=_DATA_HELP, required=True, metavar="SPEC", group="data")
    tokenizer: str = opt(
        help="the teacher's tokenizer: a model directory or hub id (the teacher itself will do)",
        required=True,
        metavar="MODEL",
        group="model",
    )
    out: str = opt(
        help="the token store: a local directory or an fsspec URL such as s3://bucket/tokens",
        required=True,
        metavar="TOKENS",
        group="output",
    )
    text_field: str = opt("text", help="field of .jsonl/.parquet/datasets rows that holds the text", group="data")
    limit_tokens: int | None = opt(help="stop reading the corpus after this many tokens", lo=2, group="data")
    shard_tokens: int = opt(
        1 << 24,
        help="tokens per shard (a unit's last shard holds the rest); a worker holds one shard",
        lo=1024,
        group="output",
    )
    workers: int = opt(
        1,
        help="tokenizer processes on this machine (each takes whole input units, with cores / workers threads)",
        lo=1,
        group="distributed",
    )
    rank: int | None = opt(help="this preparer's rank (default: torchrun's RANK, else 0)", lo=0, group="distributed")
    world_size: int | None = opt(
        help="number of preparers (default: torchrun's WORLD_SIZE, else 1)", lo=1, group="distributed"
    )
    storage_option: dict[str, Any] = opt(
        {}, help="fsspec storage option for --out and for --data URLs, repeatable", metavar="KEY=VALUE", group="data"
    )
    trust_remote_code: bool = opt(False, help="allow tokenizer code from the model's repository to run", group="model")
    progress: bool = opt(True, help="show a progress bar", group="output")

    def __post_init__(self) -> None:
        check(self)
        _check_rank(self.rank, self.world_size)


def _check_rank(rank: int | None, world_size: int | None) -> None:
    if rank is not None and world_size is not None and rank >= world_size:
        from selkd.cache.options import ConfigError

        raise ConfigError(f"--rank {rank} must be < --world-size {world_size}")


@dataclass
class BuildConfig:
    teacher: str = opt(
        help="teacher model: a local Hugging Face directory or a hub id", required=True, metavar="MODEL", group="model"
    )
    data: list[str] = opt(
        [],
        help=_DATA_HELP + "; tokenized into STORE/tokens first (exclusive with --tokens)",
        metavar="SPEC",
        group="data",
    )
    tokens: str | None = opt(
        help="instead of --data: a token store made by `selkd-cache prepare` with the teacher's tokenizer",
        metavar="TOKENS",
        group="data",
    )
    out: str = opt(
        help="the cache: a local directory or an fsspec URL such as s3://bucket/prefix",
        required=True,
        metavar="STORE",
        group="output",
    )
    classes: str = opt(
        "sample:50",
        help="classes kept per position: sample:N (RS-KD, N draws, N <= 255), topk:K (K largest + tail mass), or full",
        validate=_valid_classes,
        metavar="MODE",
        group="classes",
    )
    temperature: float = opt(
        1.0, help="teacher temperature of the stored targets", lo=0.0, lo_open=True, group="classes"
    )
    max_seq_len: int = opt(512, help="tokens per packed sequence", lo=2, group="data")
    loss_on: str = opt(
        "assistant",
        help="positions that get targets: assistant (of a chat row only those before an assistant token, of "
        "plain text all; a sequence with none is skipped) or all",
        choices=LOSS_ON,
        group="data",
    )
    text_field: str | None = opt(
        help="field of .jsonl/.parquet/datasets rows that holds the text (default: text)", group="data"
    )
    limit_tokens: int | None = opt(help="stop reading the corpus after this many tokens", lo=2, group="data")
    eval_fraction: float = opt(
        0.01, help="fraction of sequences held out for evaluation (never trained on)", lo=0.0, hi=0.5, group="data"
    )
    student: str | None = opt(
        help="frozen student that scores samples for --sample-ratio (same tokenizer)",
        metavar="MODEL",
        group="selection",
    )
    sample_ratio: float | None = opt(
        help="keep only this fraction of training sequences, the highest scored (needs --student unless "
        "--sample-signal is random or teacher-entropy)",
        lo=0.0,
        lo_open=True,
        hi=1.0,
        group="selection",
    )
    sample_signal: str = opt(
        "student-entropy", help="how sequences are scored for --sample-ratio", choices=SAMPLE_SIGNALS, group="selection"
    )
    part_tokens: int = opt(
        1 << 20, help="about this many positions per part (one writer per part)", lo=2, group="output"
    )
    seed: int = opt(0, help="seed of class sampling, the eval split and random sample selection", lo=0, group="classes")
    device: str = opt(
        "auto", help="device of the teacher and student: auto (cuda when available), cuda, cpu, cuda:N", group="model"
    )
    dtype: str = opt("auto", help="teacher dtype: auto (bf16 on GPU, fp32 on CPU)", choices=DTYPES, group="model")
    batch_size: int = opt(8, help="sequences per teacher forward pass", lo=1, group="model")
    teacher_device_map: str | None = opt(
        help=TEACHER_DEVICE_MAP_HELP, metavar="MAP", validate=valid_device_map, group="model"
    )
    # Fewer positions per head matmul re-read the [V, H] head weight more often: 55 ran the CPU build at half
    # speed, 256 at 0.83x the bare forward, 1024 at 0.90x (docs/results.md section 2).
    head_chunk_tokens: int = opt(
        1024,
        help="positions per matmul of the teacher's LM head, across the sequences of a batch: its [chunk, V] "
        "logits buffer (float32: 594 MiB at 1024 x 151,936; bf16: half) and the class selection's two "
        "float32 [256, V] scratch buffers (297 MiB) are what the teacher needs beyond its activations, "
        "whatever the batch and sequence length; on a GPU, sample:N draws depend on it",
        lo=1,
        group="model",
    )
    doc_attention: bool = opt(
        True,
        help="each packed document attends only to itself (position ids restart per document); "
        "--no-doc-attention lets tokens attend across document boundaries",
        group="model",
    )
    trust_remote_code: bool = opt(False, help="allow model code from the model's repository to run", group="model")
    rank: int | None = opt(help="this builder's rank (default: torchrun's RANK, else 0)", lo=0, group="distributed")
    world_size: int | None = opt(
        help="number of builders (default: torchrun's WORLD_SIZE, else 1)", lo=1, group="distributed"
    )
    storage_option: dict[str, Any] = opt(
        {},
        help="fsspec storage option for --out, --tokens and --data URLs, repeatable",
        metavar="KEY=VALUE",
        group="data",
    )
    lease_ttl: float = opt(
        600.0,
        help="seconds a builder's claim (lease) on a part lasts unless renewed; another builder takes the part "
        "over once it lapses (a dead builder on the same host is detected at once)",
        lo=5.0,
        group="distributed",
    )
    progress: bool = opt(True, help="show progress bars", group="output")

    def __post_init__(self) -> None:
        check(self)
        from selkd.cache.options import ConfigError

        if self.sample_ratio is not None and self.student is None and self.sample_signal == "student-entropy":
            raise ConfigError("--sample-ratio with --sample-signal student-entropy needs --student MODEL")
        _check_rank(self.rank, self.world_size)
        if bool(self.data) == (self.tokens is not None):
            which = "both were given" if self.data else "neither was given"
            raise ConfigError(f"give either --data SPEC [SPEC ...] or --tokens TOKENS (prepared); {which}")
        if self.tokens is not None:
            given = [f for f, v in (("--text-field", self.text_field), ("--limit-tokens", self.limit_tokens)) if v]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: fixed when the token store was prepared (see `selkd-cache info "
                    f"{self.tokens}`); prepare another one to change them"
                )
        elif self.text_field is None:
            self.text_field = "text"

    @property
    def class_spec(self) -> ClassSpec:
        return ClassSpec.parse(self.classes)


# Options that change what is stored: a rerun on the same --out must match these exactly.
SETTINGS_KEYS = (
    "classes",
    "temperature",
    "max_seq_len",
    "loss_on",
    "text_field",
    "limit_tokens",
    "eval_fraction",
    "student",
    "sample_ratio",
    "sample_signal",
    "part_tokens",
    "seed",
    "doc_attention",
)
# The value a setting had in caches written before it was an option (their headers lack it).
SETTINGS_BEFORE_OPTION: dict[str, Any] = {"doc_attention": False}  # they attended across documents
