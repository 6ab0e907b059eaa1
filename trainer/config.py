"""TrainConfig: every option of ``selkd-train``, declared once.

Two data modes, exactly one per run:

* **cache** (offline, the default workflow): ``--cache STORE`` streams the sparse teacher targets a
  ``selkd-cache build`` wrote. The class selection, teacher temperature, sequence length and eval split
  were fixed when the cache was built, so the online data options (``--classes``, ``--temperature``,
  ``--max-seq-len``, ``--text-field``, ``--limit-tokens``, ``--eval-fraction``) are refused here rather
  than silently ignored.
* **online**: ``--teacher MODEL --data SPEC...`` runs the teacher during training. The online data
  options mirror ``selkd-cache build``'s and take its defaults, except ``--classes``, which defaults to
  ``full``: an online teacher's full distribution is already in memory, and the loss only ever needs it
  at the selected positions (``[N_sel, V]``), so exact targets cost nothing extra, whereas sparse targets
  exist to make *storage* cheap. Those defaults are filled in by ``__post_init__`` so that the saved
  config (and resume checks) record the values the run really used; in cache mode they stay ``None``.

The student is either ``--student MODEL`` (pretrained weights) or ``--student-config CONFIG`` (a fresh
random init from a config directory / hub id): exactly one.

Resume: a rerun on the same ``--out`` must match the saved config except for :data:`RESUME_MUTABLE`
(see :func:`config_differences`). ``storage_option`` values that look like credentials are redacted by
:meth:`TrainConfig.to_dict` so they never land in checkpoint directories.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from selkd.cache.config import LOSS_ON, TEACHER_DEVICE_MAP_HELP, valid_device_map
from selkd.cache.modes import ClassSpec
from selkd.cache.options import (
    ConfigError,
    OptionParser,
    add_arguments,
    add_version,
    build,
    check,
    flag_name,
    from_args,
    opt,
    read_config_file,
)
from selkd.trainer.report import REPORT_NONE, check_report_to, parse_report_to
from selkd.trainer.spec import (
    DEFAULT_CURRICULUM_STEPS,
    DEFAULT_GLOBAL_CAPACITY,
    FULL_KD,
    LOSS_NAMES,
    POLICY_NAMES,
    SAMPLING_POLICIES,
    SIGNAL_NAMES,
    SelectSpec,
    parse_select,
)
from selkd.trainer.targets_check import check_targets

__all__ = [
    "DTYPES",
    "ONLINE_DEFAULTS",
    "REDACTED",
    "RESUME_MUTABLE",
    "SCHEDULES",
    "TrainConfig",
    "build_parser",
    "config_differences",
    "steps_raised",
]

SCHEDULES = ("cosine", "linear", "constant")
# --dtype and --teacher-dtype. fp16 is left out on purpose: training in it needs loss scaling (GradScaler).
DTYPES = ("auto", "fp32", "bf16")
CE_ON = ("all", "selected")

# Online-mode data options: their defaults (the same as `selkd-cache build`, except classes).
ONLINE_DEFAULTS: dict[str, Any] = {
    "classes": "full",
    "temperature": 1.0,
    "max_seq_len": 512,
    "text_field": "text",
    "eval_fraction": 0.01,
    "split_seed": 0,
    "teacher_dtype": "auto",
}
_ONLINE_ONLY = (*ONLINE_DEFAULTS, "limit_tokens", "teacher_device_map")

# Options that may change between a run and its resumption: they do not change what is learned
# (logging, evaluation cadence, I/O, memory knobs, where things live) or, for steps/epochs, extend the
# run (see steps_raised). Everything else must match the checkpoint's config exactly.
RESUME_MUTABLE: tuple[str, ...] = (
    "teacher_device_map",
    "steps",
    "epochs",
    "progress",
    "log_every",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_checkpoints",
    "resume",
    "num_workers",
    "prefetch",
    "report_to",
    "out",
    "storage_option",
    "device",
    "gradient_checkpointing",
    "entropy_chunk",
    "fsdp",
    "trust_remote_code",
)

REDACTED = "<redacted>"
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session")


def _parse_select(text: str) -> SelectSpec:
    try:
        return parse_select(text)
    except ValueError as err:
        # parse_select names the flag as "--select 'TEXT': ..."; config errors read "--select: 'TEXT': ..."
        raise ConfigError(f"--select: {str(err).removeprefix('--select ')}") from None


def _valid_classes(text: str) -> str | None:
    try:
        ClassSpec.parse(text)
    except ValueError as err:
        return str(err).removeprefix("--classes ")
    return None


def _below_one(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value}"


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- data and models
    cache: str | None = opt(
        help="the cache of teacher targets: a local directory or an fsspec URL (offline mode)",
        metavar="STORE",
        group="data",
    )
    teacher: str | None = opt(
        help="teacher model run during training (online mode, with --data)", metavar="MODEL", group="model"
    )
    teacher_device_map: str | None = opt(
        help=f"online mode: {TEACHER_DEVICE_MAP_HELP}", metavar="MAP", validate=valid_device_map, group="model"
    )
    data: list[str] = opt(
        [],
        help="online mode: corpus .txt/.jsonl/.jsonl.gz/.parquet files, directories, globs (local or fsspec URLs), "
        "a `datasets` save_to_disk directory or datasets:DIR; tokenized into OUT/tokens first",
        metavar="SPEC",
        group="data",
    )
    tokens: str | None = opt(
        help="online mode, instead of --data: a token store made by `selkd-cache prepare` with the teacher's tokenizer",
        metavar="TOKENS",
        group="data",
    )
    student: str | None = opt(
        help="student to distil into: a local Hugging Face directory or a hub id", metavar="MODEL", group="model"
    )
    student_config: str | None = opt(
        help="instead of --student: start from random weights built from this config (directory or hub id)",
        metavar="CONFIG",
        group="model",
    )
    out: str = opt(
        help="output directory: checkpoints/, final/, logs; a new or empty directory, or an earlier run to resume "
        "(never one of the inputs)",
        required=True,
        metavar="DIR",
        group="output",
    )
    storage_option: dict[str, Any] = opt(
        {},
        help="fsspec storage option for --cache, --tokens and --data URLs, repeatable",
        metavar="KEY=VALUE",
        group="data",
    )
    # online-mode data options (None in cache mode; see ONLINE_DEFAULTS)
    text_field: str | None = opt(
        help="online mode: field of .jsonl/.parquet/datasets rows that holds the text (default: text)", group="data"
    )
    max_seq_len: int | None = opt(help="online mode: tokens per packed sequence (default: 512)", lo=2, group="data")
    limit_tokens: int | None = opt(
        help="online mode: stop reading the corpus after this many tokens", lo=2, group="data"
    )
    eval_fraction: float | None = opt(
        help="online mode: fraction of sequences held out for evaluation (default: 0.01)", lo=0.0, hi=0.5, group="data"
    )
    split_seed: int | None = opt(
        help="online mode: seed of the held-out split (default: 0, as selkd-cache build's --seed); apart from "
        "--seed so that another training seed never moves sequences between the splits",
        lo=0,
        group="data",
    )
    classes: str | None = opt(
        help="online mode: teacher classes per position: full (default: exact, the "
        "logits are in memory anyway), topk:K or sample:N",
        validate=_valid_classes,
        metavar="MODE",
        group="classes",
    )
    temperature: float | None = opt(
        help="online mode: teacher temperature of the targets (default: 1.0); the student's logits are divided by "
        "it too and the KD term is multiplied by T^2",
        lo=0.0,
        lo_open=True,
        group="classes",
    )
    doc_attention: bool | None = opt(
        help="each packed document attends only to itself, in the student (and the online teacher) (default: "
        "on in online mode; with --cache, what the cache's teacher pass used)",
        group="model",
    )
    loss_on: str | None = opt(
        help="positions trained: assistant (of a chat row only those before an assistant token) or all; "
        "default assistant; with --cache fixed by the cache (another value is refused)",
        choices=LOSS_ON,
        group="data",
    )
    # ---------------------------------------------------------------- selection and loss
    select: str = opt(
        "student-entropy:0.2",
        help=f"positions distilled: SIGNAL:FRACTION (signals: {', '.join(SIGNAL_NAMES)}), none (full KD), or the "
        "hybrid SIGNAL:FRACTION+random:SHARE (e.g. student-entropy:0.15+random:0.05: the policy's selection plus "
        "that share of each sequence drawn uniformly from the positions it left)",
        metavar="SIGNAL:FRACTION",
        group="selection",
    )
    select_policy: str = opt(
        "sequence",
        help="how scores become a selection: sequence (top-k per sequence, the paper's), batch (top-k of the "
        "batch), global (threshold from a queue of recent scores, GLS), stochastic (draws with replacement in "
        "proportion to the score, Pos RS-KD), curriculum (a window sliding from the lowest scores to the top-k)",
        choices=POLICY_NAMES,
        group="selection",
    )
    global_queue: int = opt(
        DEFAULT_GLOBAL_CAPACITY, help="scores kept by --select-policy global", lo=1, group="selection"
    )
    curriculum_steps: int = opt(
        DEFAULT_CURRICULUM_STEPS,
        help="--select-policy curriculum: optimizer steps until the window reaches the top-k, where it stays",
        lo=1,
        group="selection",
    )
    importance_weights: bool = opt(
        True,
        help="--select-policy stochastic: weight each draw by 1 / (n q), so that the loss is an unbiased estimate "
        "of full KD (Hansen-Hurwitz); off: the plain mean over the draws, an unbiased estimate of the "
        "score-weighted KD",
        group="selection",
    )
    loss: str = opt("fkl", help="divergence at the selected positions", choices=LOSS_NAMES, group="optimisation")
    topk_renormalize: bool = opt(
        False,
        help="topk targets: the biased top-k baseline, the teacher's k probabilities renormalised (no tail) "
        "against the student's full distribution, which pushes all its mass onto the k classes",
        group="classes",
    )
    kd_weight: float = opt(
        1.0,
        help="weight of the KD loss, which is also multiplied by T^2 when the targets' temperature T is not 1 "
        "(keeps its gradient scale); 0 trains on the CE term alone, the plain-training baseline (needs "
        "--ce-weight > 0, --ce-on all and --select none)",
        lo=0.0,
        group="optimisation",
    )
    ce_weight: float = opt(
        0.0, help="weight of the next-token cross-entropy added to the KD loss", lo=0.0, group="optimisation"
    )
    ce_on: str = opt(
        "all",
        help="positions the CE term covers: all valid positions or the selected ones",
        choices=CE_ON,
        group="optimisation",
    )
    sample_ratio: float | None = opt(
        help="train only on this fraction of training sequences, those with the highest mean student entropy",
        lo=0.0,
        lo_open=True,
        hi=1.0,
        group="selection",
    )
    # ---------------------------------------------------------------- optimisation
    batch_size: int = opt(8, help="sequences per step per rank (before --grad-accum)", lo=1, group="optimisation")
    grad_accum: int = opt(1, help="micro-batches accumulated per optimizer step", lo=1, group="optimisation")
    lr: float = opt(1e-4, help="peak learning rate (AdamW)", lo=0.0, lo_open=True, group="optimisation")
    weight_decay: float = opt(0.0, help="AdamW weight decay", lo=0.0, group="optimisation")
    adam_beta1: float = opt(0.9, help="AdamW beta1", validate=_below_one, group="optimisation")
    adam_beta2: float = opt(0.999, help="AdamW beta2", validate=_below_one, group="optimisation")
    adam_eps: float = opt(1e-8, help="AdamW epsilon", lo=0.0, lo_open=True, group="optimisation")
    warmup_steps: int = opt(0, help="linear warm-up steps", lo=0, group="optimisation")
    warmup_ratio: float | None = opt(
        help="instead of --warmup-steps: warm up for this fraction of the steps", lo=0.0, hi=1.0, group="optimisation"
    )
    schedule: str = opt("cosine", help="learning-rate decay after warm-up", choices=SCHEDULES, group="optimisation")
    min_lr_ratio: float = opt(
        0.0, help="final learning rate as a fraction of --lr", lo=0.0, hi=1.0, group="optimisation"
    )
    max_grad_norm: float = opt(1.0, help="gradient clipping norm; 0 disables clipping", lo=0.0, group="optimisation")
    steps: int | None = opt(
        help="optimizer steps to train (exclusive with --epochs; default: 1 epoch)", lo=1, group="optimisation"
    )
    epochs: float | None = opt(
        help="passes over the training data, may be fractional (exclusive with --steps)",
        lo=0.0,
        lo_open=True,
        group="optimisation",
    )
    seed: int = opt(0, help="seed of initialisation, data order and random selection", lo=0, group="optimisation")
    # ---------------------------------------------------------------- runtime
    dtype: str = opt(
        "auto",
        help="the student's weights, trained, checkpointed and saved to OUT/final in this dtype (the computation "
        "too): auto (the dtype its config.json declares: bf16 stays bf16; fp32, fp16 or none: fp32), fp32 or bf16",
        choices=DTYPES,
        group="model",
    )
    master_weights: bool = opt(
        False,
        help="with bf16 weights (--dtype): train fp32 master weights and AdamW state (checkpoints hold them, so a "
        "resume is exact), compute in bf16 under autocast, and save OUT/final in bf16; no effect with fp32",
        group="model",
    )
    teacher_dtype: str | None = opt(
        help="online mode: the teacher's dtype: auto (the dtype its config.json declares; default), fp32 or bf16",
        choices=DTYPES,
        group="model",
    )
    device: str = opt(
        "auto", help="auto (cuda when available), cuda, cpu or cuda:N (torchrun: the local rank's GPU)", group="model"
    )
    gradient_checkpointing: bool = opt(
        False, help="recompute decoder activations in backward (less memory)", group="model"
    )
    entropy_chunk: int = opt(128, help="positions per no-grad scoring chunk of the LM head", lo=1, group="selection")
    num_workers: int = opt(1, help="DataLoader worker processes (0: load in the training process)", lo=0, group="data")
    prefetch: int = opt(2, help="batches prefetched per worker", lo=1, group="data")
    eval_every: int = opt(200, help="evaluate every N steps; 0 disables periodic evaluation", lo=0, group="output")
    eval_batches: int | None = opt(
        help="batches per evaluation (default: the whole held-out split)", lo=1, group="output"
    )
    log_every: int = opt(10, help="log every N steps", lo=1, group="output")
    save_every: int = opt(500, help="checkpoint every N steps; 0 saves only at the end", lo=0, group="output")
    keep_checkpoints: int = opt(
        1,
        help="complete checkpoints kept in OUT/checkpoints (each holds the weights and the optimizer state, "
        "about 3x the final model; 6x with --master-weights): the newest N; 0 removes them once the run has "
        "finished and written OUT/final (at least one is kept while training, to resume from), and the run can "
        "then not be extended",
        lo=0,
        group="output",
    )
    resume: bool = opt(False, help="require an existing checkpoint in --out and continue from it", group="output")
    fsdp: bool = opt(
        False, help="shard the student with FSDP2 (fully_shard) instead of DDP under torchrun", group="distributed"
    )
    allow_missing_parts: bool = opt(False, help="train on an incomplete cache (only its committed parts)", group="data")
    progress: bool = opt(True, help="show progress bars", group="output")
    trust_remote_code: bool = opt(False, help="allow model code from the model's repository to run", group="model")
    report_to: str = opt(
        REPORT_NONE,
        help="also log metrics.jsonl's scalars to these (a comma list): tensorboard (OUT/tensorboard), wandb "
        "(OUT/wandb; WANDB_MODE=offline needs no network), trackio (its local database), or none",
        validate=check_report_to,
        metavar="NAMES",
        group="output",
    )

    def __post_init__(self) -> None:
        check(self)  # also coerces file/JSON values to the declared types
        # --select, parsed once; the field keeps the text (saved configs compare as strings)
        self.select_spec: SelectSpec = _parse_select(self.select)
        self._check_sources()
        self._check_targets()
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both (neither: 1 epoch)")
        if self.warmup_ratio is not None and self.warmup_steps > 0:
            raise ConfigError("give --warmup-steps or --warmup-ratio, not both")
        if self.kd_weight == 0:
            self._check_ce_only()
        if self.select_policy == FULL_KD and not self.select_spec.full_kd:
            raise ConfigError(
                f"--select-policy none keeps every position, which contradicts --select {self.select}; "
                "use --select none for full KD"
            )
        if self.select_spec.random_share and self.select_policy in SAMPLING_POLICIES:
            raise ConfigError(
                f"--select {self.select} with --select-policy {self.select_policy}: that policy draws its positions "
                "at random already; drop the +random share or use --select-policy sequence"
            )

    def _check_sources(self) -> None:
        if (self.cache is None) == (self.teacher is None):
            which = "both were given" if self.cache is not None else "neither was given"
            raise ConfigError(
                f"give either --cache STORE (offline targets) or --teacher MODEL --data SPEC (online); {which}"
            )
        if self.teacher is not None and bool(self.data) == (self.tokens is not None):
            which = "both were given" if self.data else "neither was given"
            raise ConfigError(f"--teacher (online mode) needs --data SPEC [SPEC ...] or --tokens TOKENS; {which}")
        if self.tokens is not None:
            given = [flag_name(k) for k in ("text_field", "limit_tokens") if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: fixed when the token store {self.tokens} was prepared; prepare another one "
                    "to change them"
                )
        if self.cache is not None:
            if self.data or self.tokens is not None:
                flag = "--data" if self.data else "--tokens"
                raise ConfigError(f"{flag} is for online mode (--teacher); --cache already holds the data")
            given = [flag_name(k) for k in _ONLINE_ONLY if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: online-mode option(s); with --cache these were fixed when the "
                    "cache was built (see `selkd-cache info`)"
                )
        else:
            for key, default in ONLINE_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, default)
            self.loss_on = self.loss_on or LOSS_ON[0]
        if (self.student is None) == (self.student_config is None):
            which = "both were given" if self.student is not None else "neither was given"
            raise ConfigError(
                f"give either --student MODEL (pretrained) or --student-config CONFIG (random init); {which}"
            )

    def _check_ce_only(self) -> None:
        """--kd-weight 0: plain CE on every position; options that only shape the KD term would be ignored
        silently, so they are refused instead."""
        if self.ce_weight == 0:
            raise ConfigError("--kd-weight 0 with --ce-weight 0 leaves nothing to train: give --ce-weight 1")
        if not self.select_spec.full_kd:
            raise ConfigError(
                f"--kd-weight 0 distils no position, so --select {self.select} would choose for nothing: "
                "give --select none"
            )
        if self.ce_on != "all":
            raise ConfigError("--kd-weight 0 with --ce-on selected trains on no position: use --ce-on all")

    def _check_targets(self) -> None:
        """Online mode: --classes against the objective's options (cache mode checks the cache's header)."""
        if self.classes is not None:
            problem = check_targets(ClassSpec.parse(self.classes).mode, self, self.classes)
            if problem:
                raise ConfigError(problem)

    # ---------------------------------------------------------------- derived values

    @property
    def mode(self) -> str:
        """``"cache"`` or ``"online"``."""
        return "cache" if self.cache is not None else "online"

    @property
    def select_signal(self) -> str:
        """The signal name of ``--select`` (``"none"`` for full KD)."""
        return self.select_spec.signal

    @property
    def select_fraction(self) -> float:
        """The fraction of ``--select`` (1.0 for ``none``)."""
        return self.select_spec.fraction

    @property
    def effective_policy(self) -> str:
        """The policy the loop should use: ``none`` when ``--select none``, else ``--select-policy``."""
        return FULL_KD if self.select_spec.full_kd else self.select_policy

    @property
    def report_backends(self) -> list[str]:
        """``--report-to`` as backend names (``[]`` for none)."""
        return parse_report_to(self.report_to)

    @property
    def class_spec(self) -> ClassSpec | None:
        """Online mode's class selection (None in cache mode: read it from the cache)."""
        return ClassSpec.parse(self.classes) if self.classes is not None else None

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: ``--steps``, else ``ceil(epochs * steps_per_epoch)`` (1 epoch
        when neither is given). ``steps_per_epoch`` counts optimizer steps (after --grad-accum)."""
        if self.steps is not None:
            return self.steps
        if steps_per_epoch < 1:
            raise ConfigError("the training split is smaller than one optimizer step (batch size x grad accum x ranks)")
        return max(1, math.ceil((self.epochs if self.epochs is not None else 1.0) * steps_per_epoch))

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """``--warmup-steps``, or ``round(warmup_ratio * total_steps)``."""
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * total_steps)
        return self.warmup_steps

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain JSON-able dict of every option. ``redact`` hides credential-like ``storage_option`` values
        (keys containing key/secret/token/password/...) so that saved configs never hold secrets."""
        values = dataclasses.asdict(self)
        if redact:
            values["storage_option"] = {
                k: (REDACTED if any(w in str(k).lower() for w in _SECRET_WORDS) else v)
                for k, v in self.storage_option.items()
            }
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "options") -> TrainConfig:
        """Config from a mapping (field or flag names); unknown keys are refused by name."""
        return build(cls, {str(k).replace("-", "_"): v for k, v in values.items()}, source)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> TrainConfig:
        """Config from command-line arguments (``--config FILE`` first, flags override it).

        Every problem, including the ones argparse finds (unknown flag, bad choice, bad number), raises
        :class:`ConfigError`; ``--help`` still prints and exits.
        """
        parser = build_parser()
        args = parser.parse_args(list(argv) if argv is not None else None)
        file_values = read_config_file(args.config) if args.config else None
        if file_values is not None:
            _check_file_keys(file_values, args.config)
        return from_args(cls, args, file_values)


def build_parser(prog: str = "selkd-train") -> argparse.ArgumentParser:
    """The ``selkd-train`` parser: ``--config FILE`` plus one flag per :class:`TrainConfig` field."""
    parser = OptionParser(
        prog=prog,
        description="Distil a student from cached (or online) teacher targets, applying KD at the positions "
        "the student is least sure of (SE-KD).",
    )
    add_version(parser)
    parser.add_argument("--config", metavar="FILE", help="options from a YAML or TOML file (flags override it)")
    add_arguments(parser, TrainConfig)
    return parser


def _check_file_keys(values: Mapping[str, Any], path: str) -> None:
    """Refuse unknown keys naming the file (values are checked by TrainConfig itself)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s): {', '.join(unknown)}")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def config_differences(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """What differs between a checkpoint's saved config (``to_dict()`` output) and this run's, ignoring
    :data:`RESUME_MUTABLE`, as ``"flag: saved -> current"`` lines (empty: safe to resume).

    Only the current options are compared: a key missing from an older checkpoint is taken to have had
    its default (options are added with the old behaviour as default), and keys that are no longer
    options are ignored. Numbers compare by value (JSON turns 1.0 into 1.0 but YAML may give 1)."""
    now = current.to_dict()
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        a = saved[f.name] if f.name in saved else _field_default(f)
        b = now[f.name]
        if isinstance(a, tuple):
            a = list(a)
        if a != b:
            out.append(f"{flag_name(f.name)}: {a!r} -> {b!r}")
    return out


def steps_raised(saved: Mapping[str, Any], current: TrainConfig, steps_per_epoch: int | None = None) -> bool:
    """Whether this run's training budget is larger than the checkpoint's (the run is being extended:
    the trainer must rebuild the LR schedule for the new total instead of restoring the old one).

    Steps compare with steps, epochs with epochs (neither = 1 epoch). Mixing ``--steps`` and ``--epochs``
    across the two runs needs ``steps_per_epoch`` to compare; without it this raises ConfigError."""
    s_steps, s_epochs = saved.get("steps"), saved.get("epochs")
    if s_steps is None and s_epochs is None:
        s_epochs = 1.0
    c_steps = current.steps
    c_epochs = current.epochs if current.epochs is not None or c_steps is not None else 1.0
    if s_steps is not None and c_steps is not None:
        return c_steps > int(s_steps)
    if s_epochs is not None and c_epochs is not None:
        return c_epochs > float(s_epochs)
    if steps_per_epoch is None:
        raise ConfigError("cannot compare --steps with --epochs across a resume without the epoch length")
    before = int(s_steps) if s_steps is not None else math.ceil(float(s_epochs) * steps_per_epoch)
    return current.total_steps(steps_per_epoch) > before
