"""TrainConfig: CLI, YAML/TOML files with flag overrides, errors that name the flag, resume checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selkd.cache.options import ConfigError
from selkd.trainer.config import (
    ONLINE_DEFAULTS,
    RESUME_MUTABLE,
    TrainConfig,
    build_parser,
    config_differences,
    steps_raised,
)
from selkd.trainer.losses import LOSSES
from selkd.trainer.selection import POLICIES, SIGNALS

BASE = ["--cache", "store", "--student", "stu", "--out", "run"]


def cli(*extra: str) -> TrainConfig:
    return TrainConfig.from_cli([*BASE, *extra])


def test_defaults_from_cli() -> None:
    cfg = cli()
    assert cfg.mode == "cache"
    assert cfg.select == "student-entropy:0.2"
    assert (cfg.select_signal, cfg.select_fraction) == ("student-entropy", 0.2)
    assert cfg.select_policy == "sequence" and cfg.effective_policy == "sequence"
    assert cfg.loss == "fkl" and cfg.ce_weight == 0.0 and cfg.ce_on == "all"
    assert cfg.batch_size == 8 and cfg.grad_accum == 1 and cfg.lr == 1e-4
    assert cfg.schedule == "cosine" and cfg.max_grad_norm == 1.0
    assert cfg.steps is None and cfg.epochs is None and cfg.total_steps(40) == 40  # 1 epoch
    assert cfg.save_every == 500 and cfg.eval_every == 200 and cfg.log_every == 10
    assert cfg.num_workers == 1 and cfg.prefetch == 2 and cfg.entropy_chunk == 128
    assert cfg.global_queue == 30_000 and cfg.report_to == "none" and cfg.report_backends == [] and cfg.progress
    # online-only options stay unset in cache mode
    assert all(getattr(cfg, k) is None for k in ONLINE_DEFAULTS)
    assert cfg.class_spec is None


def test_cli_values_and_bools() -> None:
    cfg = cli(
        "--select", "kl:0.05", "--select-policy", "global", "--loss", "jsd", "--lr", "3e-4", "--steps", "100",
        "--resume", "--progress", "false", "--storage-option", "anon=true", "--storage-option", "key=abc",
        "--ce-weight", "1", "--ce-on", "selected", "--warmup-ratio", "0.1",
    )  # fmt: skip
    assert cfg.select_signal == "kl" and cfg.select_fraction == 0.05
    assert cfg.select_policy == "global" and cfg.loss == "jsd" and cfg.lr == 3e-4
    assert cfg.steps == 100 and cfg.total_steps(7) == 100 and cfg.resolved_warmup_steps(100) == 10
    assert cfg.resume is True and cfg.progress is False
    assert cfg.storage_option == {"anon": True, "key": "abc"}
    assert cfg.to_dict()["storage_option"] == {"anon": True, "key": "<redacted>"}
    assert cfg.to_dict(redact=False)["storage_option"]["key"] == "abc"


def test_online_mode_fills_defaults() -> None:
    cfg = TrainConfig.from_cli(["--teacher", "t", "--data", "a.jsonl", "b.jsonl", "--student-config", "c",
                                "--out", "o", "--max-seq-len", "256"])  # fmt: skip
    assert cfg.mode == "online" and cfg.data == ["a.jsonl", "b.jsonl"]
    assert cfg.classes == "full" and cfg.temperature == 1.0 and cfg.max_seq_len == 256
    assert cfg.text_field == "text" and cfg.eval_fraction == 0.01 and cfg.limit_tokens is None
    assert cfg.class_spec is not None and cfg.class_spec.mode == "full"
    # the saved dict round-trips (defaults were made explicit)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_select_none_means_full_kd() -> None:
    cfg = cli("--select", "none")
    assert cfg.select_signal == "none" and cfg.select_fraction == 1.0 and cfg.effective_policy == "none"


def test_yaml_file_with_flag_override(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "cache: s3://bucket/cache\nstudent: stu\nout: run\nlr: 1e-4\nselect: teacher-entropy:0.5\n"
        "batch-size: 4\nstorage_option:\n  anon: true\nepochs: 2\nprogress: false\n"
    )
    cfg = TrainConfig.from_cli(["--config", str(path), "--batch-size", "16", "--out", "other"])
    assert cfg.cache == "s3://bucket/cache" and cfg.student == "stu"
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # PyYAML reads 1e-4 as a string
    assert cfg.select == "teacher-entropy:0.5" and cfg.epochs == 2.0 and cfg.progress is False
    assert cfg.batch_size == 16 and cfg.out == "other"  # flags win
    assert cfg.storage_option == {"anon": True}
    assert cfg.total_steps(10) == 20


def test_toml_file_with_flag_override(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        'teacher = "t"\ndata = ["a.jsonl"]\nstudent = "stu"\nout = "run"\nclasses = "topk:8"\n'
        'loss = "rkl"\nsteps = 50\nwarmup-steps = 5\ntopk_renormalize = true\n'
    )
    cfg = TrainConfig.from_cli(["--config", str(path), "--steps", "70", "--loss", "fkl"])
    assert cfg.mode == "online" and cfg.classes == "topk:8" and cfg.topk_renormalize
    assert cfg.steps == 70 and cfg.loss == "fkl" and cfg.warmup_steps == 5


def test_file_unknown_key_and_bad_type(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cache: c\nstudent: s\nout: o\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option\(s\): learning_rate"):
        TrainConfig.from_cli(["--config", str(path)])
    path.write_text("cache: c\nstudent: s\nout: o\nsteps: 2.5\n")
    with pytest.raises(ConfigError, match="--steps: expected a whole number"):
        TrainConfig.from_cli(["--config", str(path)])
    path.write_text("cache: c\nstudent: s\nout: o\nlr: fast\n")
    with pytest.raises(ConfigError, match="--lr: expected a number"):
        TrainConfig.from_cli(["--config", str(path)])


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--select", "student-entropy:0"], r"--select: .*fraction must be in \(0, 1\]"),
        (["--select", "student-entropy:1.5"], r"--select: .*fraction must be in \(0, 1\]"),
        (["--select", "bogus:0.2"], r"--select: .*unknown signal 'bogus'; valid signals: none, student-ent"),
        (["--select", "student-entropy"], r"--select: .*expected SIGNAL:FRACTION"),
        (["--select-policy", "bogus"], r"--select-policy: invalid choice: 'bogus'"),
        (["--loss", "bogus"], r"--loss: invalid choice: 'bogus'"),
        (["--steps", "10", "--epochs", "1"], r"--steps or --epochs, not both"),
        (["--lr", "0"], r"--lr must be > 0"),
        (["--batch-size", "0"], r"--batch-size must be >= 1"),
        (["--sample-ratio", "0"], r"--sample-ratio must be > 0"),
        (["--sample-ratio", "1.5"], r"--sample-ratio must be <= 1"),
        (["--min-lr-ratio", "2"], r"--min-lr-ratio must be <= 1"),
        (["--adam-beta2", "1"], r"--adam-beta2: must be in \[0, 1\)"),
        (["--ce-weight", "-1"], r"--ce-weight must be >= 0"),
        (["--schedule", "step"], r"--schedule: invalid choice"),
        (["--warmup-steps", "5", "--warmup-ratio", "0.1"], r"--warmup-steps or --warmup-ratio"),
        (["--select-policy", "none"], r"--select-policy none keeps every position"),
        (["--classes", "topk:4"], r"--classes: online-mode option"),
        (["--teacher-device-map", "auto"], r"--teacher-device-map: online-mode option"),
        (["--data", "x.jsonl"], r"--data is for online mode"),
        (["--tokens", "t"], r"--tokens is for online mode"),
        (["--teacher", "t"], r"--cache .* or --teacher .*both were given"),
        (["--student-config", "c"], r"--student MODEL .* or --student-config .*both were given"),
        (["--progress", "maybe"], r"--progress: expected true or false"),
        (["--kd-weight", "-1"], r"--kd-weight must be >= 0"),
        (["--kd-weight", "0", "--select", "none"], r"--kd-weight 0 with --ce-weight 0 leaves nothing to train"),
        (["--kd-weight", "0", "--ce-weight", "1"], r"--kd-weight 0 distils no position.*give --select none"),
        (
            ["--kd-weight", "0", "--ce-weight", "1", "--select", "none", "--ce-on", "selected"],
            r"--kd-weight 0 with --ce-on selected trains on no position",
        ),
        (["--report-to", "tensorbord"], r"--report-to: 'tensorbord' is not one of: none, tensorboard, wandb, trackio$"),
        (["--report-to", "none,wandb"], r"--report-to: 'none' is not one of: .* \(none goes alone\)$"),
        (["--report-to", "wandb,wandb"], r"--report-to: 'wandb,wandb' names a backend twice$"),
        (["--report-to", ","], r"--report-to: expected a comma list of none, tensorboard, wandb, trackio, got ','$"),
        (["--bogus-flag"], r"--bogus-flag: unknown option; see selkd-train --help"),
        (["extra"], r"unexpected argument\(s\): extra"),
    ],
)
def test_bad_cli_values_name_the_flag(extra: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        cli(*extra)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--batch", "4"], r"^--batch: unknown option; did you mean --batch-size\?$"),  # abbreviation
        (["--temp", "2"], r"^--temp: unknown option; did you mean --temperature\?$"),
        (["--grad", "2"], r"^--grad: unknown option; did you mean --grad-accum or --gradient-checkpointing\?$"),
        (["--selct", "none"], r"^--selct: unknown option; did you mean --select\?$"),  # typo
        (["--lerning-rate=1"], r"^--lerning-rate: unknown option; see selkd-train --help$"),
        (["--lr", "-1e-4"], r"^--lr must be > 0.0, got -0.0001$"),  # a number, then the range check
        (["--lr=-1E-4"], r"^--lr must be > 0.0, got -0.0001$"),
        (["--adam-eps", "-.5"], r"^--adam-eps must be > 0.0, got -0.5$"),
        (["--no-progress", "false"], r"^unexpected argument\(s\): false$"),
    ],
)
def test_abbreviations_typos_and_negative_numbers(extra: list[str], pattern: str) -> None:
    """Abbreviated flags are refused (a later option sharing the prefix would change their meaning), an
    unknown flag gets the nearest known ones, and "-1e-4" is a number, not an option."""
    with pytest.raises(ConfigError, match=pattern):
        cli(*extra)


@pytest.mark.parametrize(
    ("extra", "progress", "resume"),
    [
        ([], True, False),
        (["--no-progress", "--resume"], False, True),
        (["--progress", "false", "--resume", "true"], False, True),
        (["--progress=no", "--no-resume"], False, False),
        (["--no-progress", "--progress"], True, False),  # the last one wins
    ],
)
def test_boolean_flags(extra: list[str], progress: bool, resume: bool) -> None:
    cfg = cli(*extra)
    assert (cfg.progress, cfg.resume) == (progress, resume)


def test_cli_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from selkd.trainer.cli import main

    for extra in (["--clases", "full"], ["--lr", "-1e-4"], ["--steps"], ["--progress", "maybe"]):
        assert main([*BASE, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("selkd-train: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("bad.yaml", "cache: c\nstudent: s\n  out: o\n", r"bad.yaml: invalid YAML at line 3, column 6: mapping values"),
        ("bad.yaml", "cache: c\nselect: [a, b\n", r"bad.yaml: invalid YAML at line 3, column 1: expected ',' or ']'"),
        ("bad.yml", "cache: c\n\tstudent: s\n", r"bad.yml: invalid YAML at line 2, column 1: found character '\\t'"),
        ("bad.json", '{"cache": "c" "out": "o"}', r"bad.json: invalid JSON at line 1, column 15: expected ','"),
        ("bad.toml", 'cache = "c"\nstudent = \n', r"bad.toml: invalid TOML at line 2, column 11: Invalid value"),
        ("bad.toml", 'cache = "c\n', r"bad.toml: invalid TOML at line 1, column 11: "),
        ("bad.toml", "[a]\nb = 1\n[a]\n", r"bad.toml: invalid TOML at line 3, column 3: Cannot declare"),
        ("list.yaml", "- cache\n- c\n", r"list.yaml: expected a mapping of option names to values"),
        ("null.yaml", "cache: c\nstudent: s\nout: o\nlr:\n", r"^--lr: needs a value, got none \(null\)$"),
    ],
)
def test_config_file_syntax_errors_name_file_and_line(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as err:
        TrainConfig.from_cli(["--config", str(path)])
    assert "\n" not in str(err.value)


def test_config_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selkd.trainer.cli import main

    path = tmp_path / "bin.yaml"
    path.write_bytes(b"cache: c\nstudent: \xff\xfe\n")
    assert main(["--config", str(path)]) == 2
    assert (
        capsys.readouterr().err == f"selkd-train: error: --config {path}: not UTF-8 text (byte 18); save it as UTF-8\n"
    )


def test_python_construction_errors() -> None:
    ok = {"cache": "c", "student": "s", "out": "o"}
    with pytest.raises(ConfigError, match="--select-policy: 'bogus' is not one of: " + ", ".join(POLICIES)):
        TrainConfig(**ok, select_policy="bogus")
    with pytest.raises(ConfigError, match="--loss: 'kl' is not one of: " + ", ".join(LOSSES)):
        TrainConfig(**ok, loss="kl")
    with pytest.raises(ConfigError, match="valid signals: none, " + ", ".join(SIGNALS)):
        TrainConfig(**ok, select="entropy:0.2")
    with pytest.raises(ConfigError, match="neither was given"):
        TrainConfig(cache="c", out="o")
    with pytest.raises(ConfigError, match=r"--cache STORE .*neither was given"):
        TrainConfig(student="s", out="o")
    with pytest.raises(ConfigError, match="--out is required"):
        TrainConfig(cache="c", student="s")
    with pytest.raises(ConfigError, match="--teacher .* needs --data"):
        TrainConfig(teacher="t", student="s", out="o")
    with pytest.raises(ConfigError, match=r"needs --data SPEC \[SPEC ...\] or --tokens TOKENS; both were given"):
        TrainConfig(teacher="t", data=["d"], tokens="k", student="s", out="o")
    with pytest.raises(ConfigError, match="--text-field, --limit-tokens: fixed when the token store k was prepared"):
        TrainConfig(teacher="t", tokens="k", student="s", out="o", text_field="body", limit_tokens=9)
    assert TrainConfig(teacher="t", tokens="k", student="s", out="o").mode == "online"


def test_online_target_checks() -> None:
    online = {"teacher": "t", "data": ["d"], "student": "s", "out": "o"}
    with pytest.raises(ConfigError, match="--loss rkl is not defined on sampled targets"):
        TrainConfig(**online, classes="sample:50", loss="rkl")
    with pytest.raises(ConfigError, match="--topk-renormalize needs --classes topk:K"):
        TrainConfig(**online, topk_renormalize=True)
    with pytest.raises(ConfigError, match="--select reverse-kl needs topk or full targets"):
        TrainConfig(**online, classes="sample:50", select="reverse-kl:0.2")
    with pytest.raises(ConfigError, match="--classes: 'topk:0': K must be >= 1"):
        TrainConfig(**online, classes="topk:0")
    assert TrainConfig(**online, classes="sample:50").class_spec.k == 50  # type: ignore[union-attr]


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--cache",
        "--student-config",
        "--select",
        "--select-policy",
        "--global-queue",
        "--ce-on",
        "--fsdp",
        "--allow-missing-parts",
        "--report-to",
        "--config",
    ):
        assert flag in text


def test_config_differences_ignores_mutable_keys() -> None:
    saved = json.loads(json.dumps(cli("--steps", "100").to_dict()))  # as read back from config.json
    same = cli("--steps", "300", "--progress", "false", "--log-every", "1", "--eval-every", "0",
               "--save-every", "7", "--resume", "--num-workers", "0", "--prefetch", "4", "--report-to", "tensorboard",
               "--out", "elsewhere", "--entropy-chunk", "64", "--fsdp")  # fmt: skip
    assert config_differences(saved, same) == []
    changed = cli("--steps", "100", "--lr", "1e-3", "--select", "student-entropy:0.1")
    diffs = config_differences(saved, changed)
    assert diffs == ["--select: 'student-entropy:0.2' -> 'student-entropy:0.1'", "--lr: 0.0001 -> 0.001"]
    assert {
        "steps",
        "progress",
        "log_every",
        "eval_every",
        "save_every",
        "resume",
        "num_workers",
        "prefetch",
        "report_to",
    } <= set(RESUME_MUTABLE)


def test_config_differences_old_checkpoint_and_removed_keys() -> None:
    cfg = cli()
    saved = cfg.to_dict()
    del saved["global_queue"]  # option added after the checkpoint was written: taken as its default
    saved["some_removed_option"] = 3  # option that no longer exists: ignored
    assert config_differences(saved, cfg) == []
    assert config_differences(saved, cli("--global-queue", "10")) == ["--global-queue: 30000 -> 10"]


def test_steps_raised() -> None:
    saved = cli("--steps", "100").to_dict()
    assert steps_raised(saved, cli("--steps", "200"))
    assert not steps_raised(saved, cli("--steps", "100"))
    assert not steps_raised(saved, cli("--steps", "50"))
    by_epoch = cli().to_dict()  # neither: 1 epoch
    assert steps_raised(by_epoch, cli("--epochs", "2"))
    assert not steps_raised(by_epoch, cli())
    with pytest.raises(ConfigError, match="epoch length"):
        steps_raised(by_epoch, cli("--steps", "10"))
    assert steps_raised(by_epoch, cli("--steps", "10"), steps_per_epoch=5)
    assert not steps_raised(by_epoch, cli("--steps", "5"), steps_per_epoch=5)


def test_total_steps_fractional_epochs() -> None:
    assert cli("--epochs", "0.5").total_steps(9) == 5
    with pytest.raises(ConfigError, match="smaller than one optimizer step"):
        cli().total_steps(0)


def test_precision_of_dtype_and_master_weights() -> None:
    """--dtype is the weights' dtype (the computation's too); --master-weights keeps fp32 weights with a
    bf16 --dtype, computes under bf16 autocast and saves bf16."""
    import torch

    from selkd.trainer.setup import Precision, resolve_precision

    f32, bf16 = torch.float32, torch.bfloat16
    assert resolve_precision(cli("--dtype", "bf16")) == Precision(bf16, None, bf16)
    assert resolve_precision(cli("--dtype", "fp32")) == Precision(f32, None, f32)
    assert resolve_precision(cli("--dtype", "bf16", "--master-weights")) == Precision(f32, bf16, bf16)
    assert resolve_precision(cli("--dtype", "fp32", "--master-weights")) == Precision(f32, None, f32)
