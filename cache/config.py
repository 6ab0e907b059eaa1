"""BuildConfig: every option of `selkd-cache build`, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selkd.cache.modes import ClassSpec
from selkd.cache.options import check, opt

SAMPLE_SIGNALS = ("student-entropy", "teacher-entropy", "random")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def _valid_classes(text: str) -> str | None:
    try:
        ClassSpec.parse(text)
    except ValueError as err:
        return str(err).split(": ", 1)[-1]
    return None


@dataclass
class BuildConfig:
    teacher: str = opt(help="teacher model: a local Hugging Face directory or a hub id", required=True, metavar="MODEL")
    data: list[str] = opt(
        help="corpus: .txt/.jsonl/.jsonl.gz/.parquet files, directories, globs, or a `datasets` save_to_disk directory",
        required=True,
        metavar="SPEC",
    )
    out: str = opt(
        help="the cache: a local directory or an fsspec URL such as s3://bucket/prefix",
        required=True,
        metavar="STORE",
    )
    classes: str = opt(
        "sample:50",
        help="classes kept per position: sample:N (RS-KD, N draws, N <= 255), topk:K (K largest + tail mass), or full",
        validate=_valid_classes,
        metavar="MODE",
    )
    temperature: float = opt(1.0, help="teacher temperature of the stored targets", lo=0.0, lo_open=True)
    max_seq_len: int = opt(512, help="tokens per packed sequence", lo=2)
    text_field: str = opt("text", help="field of .jsonl/.parquet/datasets rows that holds the text")
    limit_tokens: int | None = opt(help="stop reading the corpus after this many tokens", lo=2)
    eval_fraction: float = opt(
        0.01, help="fraction of sequences held out for evaluation (never trained on)", lo=0.0, hi=0.5
    )
    student: str | None = opt(
        help="frozen student that scores samples for --sample-ratio (same tokenizer)", metavar="MODEL"
    )
    sample_ratio: float | None = opt(
        help="keep only this fraction of training sequences, the highest scored (needs --student unless "
        "--sample-signal is random or teacher-entropy)",
        lo=0.0,
        lo_open=True,
        hi=1.0,
    )
    sample_signal: str = opt(
        "student-entropy", help="how sequences are scored for --sample-ratio", choices=SAMPLE_SIGNALS
    )
    part_tokens: int = opt(1 << 20, help="about this many positions per part (one writer per part)", lo=2)
    seed: int = opt(0, help="seed of class sampling, the eval split and random sample selection", lo=0)
    device: str = opt("auto", help="device of the teacher and student: auto (cuda when available), cuda, cpu, cuda:N")
    dtype: str = opt("auto", help="teacher dtype: auto (bf16 on GPU, fp32 on CPU)", choices=DTYPES)
    batch_size: int = opt(8, help="sequences per teacher forward pass", lo=1)
    trust_remote_code: bool = opt(False, help="allow model code from the model's repository to run")
    rank: int | None = opt(help="this builder's rank (default: torchrun's RANK, else 0)", lo=0)
    world_size: int | None = opt(help="number of builders (default: torchrun's WORLD_SIZE, else 1)", lo=1)
    storage_option: dict[str, Any] = opt({}, help="fsspec storage option for --out, repeatable", metavar="KEY=VALUE")
    lease_ttl: float = opt(
        600.0,
        help="seconds a builder's claim (lease) on a part lasts unless renewed; another builder takes the part "
        "over once it lapses (a dead builder on the same host is detected at once)",
        lo=5.0,
    )
    progress: bool = opt(True, help="show progress bars")

    def __post_init__(self) -> None:
        check(self)
        if self.sample_ratio is not None and self.student is None and self.sample_signal == "student-entropy":
            from selkd.cache.options import ConfigError

            raise ConfigError("--sample-ratio with --sample-signal student-entropy needs --student MODEL")
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            from selkd.cache.options import ConfigError

            raise ConfigError(f"--rank {self.rank} must be < --world-size {self.world_size}")

    @property
    def class_spec(self) -> ClassSpec:
        return ClassSpec.parse(self.classes)


# Options that change what is stored: a rerun on the same --out must match these exactly.
SETTINGS_KEYS = (
    "classes",
    "temperature",
    "max_seq_len",
    "text_field",
    "limit_tokens",
    "eval_fraction",
    "student",
    "sample_ratio",
    "sample_signal",
    "part_tokens",
    "seed",
)
