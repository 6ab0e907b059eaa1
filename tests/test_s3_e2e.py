"""End to end on object storage: build, info, verify and train on ``s3://bucket/prefix``.

The endpoint is a real S3 server (moto's server mode on 127.0.0.1, started by the ``s3_endpoint``
fixture), reached through fsspec/s3fs, with options from ``--storage-option key=value`` or from the
usual AWS environment variables (``aws_env``). No mocks: requests go over HTTP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import faults  # tools/faults.py
import pytest
from s3 import AuthS3Endpoint, S3Endpoint, set_aws_env  # tests/s3.py

from selkd.cache import CacheCorruptError, open_cache
from selkd.cache import format as fmt
from selkd.cache.cli import main as cache_main
from selkd.trainer.cli import main as train_main

pytestmark = pytest.mark.slow

# Small (3 parts: ~60 objects): every object is a round trip to the in-process server.
BUILD_OPTIONS = [
    "--max-seq-len",
    "64",
    "--limit-tokens",
    "2000",
    "--part-tokens",
    "1024",
    "--classes",
    "topk:8",
    "--eval-fraction",
    "0.1",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--progress",
    "false",
]


def option_flags(options: dict[str, Any]) -> list[str]:
    """``--storage-option key=value`` flags (JSON for non-strings)."""
    flags = []
    for key, value in options.items():
        flags += ["--storage-option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return flags


def build_argv(teacher: Path, data: Path, out: str, *extra: str) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(data), "--out", out, *BUILD_OPTIONS, *extra]


def train_argv(cache: str, student: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--cache",
        cache,
        "--student",
        str(student),
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--device",
        "cpu",
        "--progress",
        "false",
        *extra,
    ]


def run(main: Any, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def s3fs_of(endpoint: S3Endpoint) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint.endpoint_url,
        key=endpoint.storage_options["key"],
        secret=endpoint.storage_options["secret"],
        use_listings_cache=False,
    )


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("s3_e2e_local") / "cache"
    assert cache_main(build_argv(tiny_teacher_dir, text_corpus_dir, str(out))) == 0
    return out


@pytest.fixture(scope="module")
def s3_cache(s3_endpoint: S3Endpoint, tiny_teacher_dir: Path, text_corpus_dir: Path) -> str:
    """The same cache built on S3 with --storage-option flags (module scope: read-only)."""
    url = s3_endpoint.url("e2e/options")
    argv = build_argv(tiny_teacher_dir, text_corpus_dir, url, *option_flags(s3_endpoint.storage_options))
    assert cache_main(argv) == 0
    return url


def test_build_info_verify_with_storage_options(
    s3_cache: str,
    s3_endpoint: S3Endpoint,
    local_cache: Path,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = option_flags(s3_endpoint.storage_options)
    code, out, _ = run(cache_main, ["info", s3_cache, "--json", *flags], capsys)
    info = json.loads(out)
    assert code == 0 and info["parts_incomplete"] == 0 and info["parts_committed"] == 3 and info["finalized"]
    code, out, _ = run(cache_main, ["verify", s3_cache, *flags], capsys)
    assert code == 0 and f"parts verified in {s3_cache}" in out
    # the same bytes as a local build of the same settings, part for part
    assert faults.cache_digest(s3_cache, s3_endpoint.storage_options) == faults.cache_digest(local_cache)
    # a rerun on S3 is a resume: every part is committed, nothing is written
    code, _, err = run(cache_main, build_argv(tiny_teacher_dir, text_corpus_dir, s3_cache, *flags), capsys)
    assert code == 0 and "0 parts written" in err, err


def test_training_from_s3_equals_training_from_a_local_copy(
    s3_cache: str,
    s3_endpoint: S3Endpoint,
    tiny_student_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "copy"
    s3fs_of(s3_endpoint).get(s3_cache.removeprefix("s3://") + "/", str(copy), recursive=True)
    assert open_cache(str(copy)).summary is not None

    flags = option_flags(s3_endpoint.storage_options)
    # From S3 through one DataLoader worker (spawned: s3fs is not fork-safe; it opens the store itself).
    code, _, err = run(
        train_main, train_argv(s3_cache, tiny_student_dir, tmp_path / "from-s3", "--num-workers", "1", *flags), capsys
    )
    assert code == 0, err
    code, _, err = run(
        train_main, train_argv(str(copy), tiny_student_dir, tmp_path / "from-local", "--num-workers", "0"), capsys
    )
    assert code == 0, err
    from_s3, from_local = faults.train_losses(tmp_path / "from-s3"), faults.train_losses(tmp_path / "from-local")
    assert [r["step"] for r in from_s3] == list(range(1, 7))
    assert from_s3 == from_local


def test_build_info_verify_train_through_aws_environment(
    aws_env: S3Endpoint,
    tiny_teacher_dir: Path,
    tiny_student_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No --storage-option at all: endpoint, credentials and region from AWS_* variables."""
    url = aws_env.url("e2e/environment")
    code, _, err = run(cache_main, build_argv(tiny_teacher_dir, text_corpus_dir, url, "--limit-tokens", "1000"), capsys)
    assert code == 0, err
    code, out, _ = run(cache_main, ["info", url], capsys)
    assert code == 0 and "2 committed, 0 incomplete (finalized)" in out
    code, _, _ = run(cache_main, ["verify", url], capsys)
    assert code == 0
    code, _, err = run(
        train_main, train_argv(url, tiny_student_dir, tmp_path / "run", "--num-workers", "0", "--steps", "2"), capsys
    )
    assert code == 0, err
    assert len(faults.train_losses(tmp_path / "run")) == 2


def test_flipped_byte_on_s3_is_named(
    s3_cache: str, s3_endpoint: S3Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = s3fs_of(s3_endpoint)
    url = s3_endpoint.url("e2e/flipped")
    fs.copy(s3_cache.removeprefix("s3://") + "/", url.removeprefix("s3://") + "/", recursive=True)
    key = f"{url.removeprefix('s3://')}/{fmt.PARTS_GROUP}/part-00002/class_ids/c/0/0"
    if not fs.exists(key):  # 2-D arrays have a two-level chunk key
        key = key.removesuffix("/0")
    data = bytearray(fs.cat(key))
    data[len(data) // 3] ^= 0x40
    fs.pipe(key, bytes(data))

    flags = option_flags(s3_endpoint.storage_options)
    code, _, err = run(cache_main, ["verify", url, *flags], capsys)
    assert code == 1 and "part part-00002, array class_ids" in err
    reader = open_cache(url, s3_endpoint.storage_options)
    with pytest.raises(CacheCorruptError, match="part part-00002, array class_ids") as caught:
        reader.read_part("part-00002")
    assert (caught.value.part, caught.value.array) == ("part-00002", "class_ids")


def test_s3_errors_name_the_problem(
    s3_endpoint: S3Endpoint,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opts = s3_endpoint.storage_options
    # a bucket that does not exist: refused before the teacher is even loaded
    code, _, err = run(
        cache_main,
        build_argv(tiny_teacher_dir, text_corpus_dir, "s3://no-such-bucket-selkd/c", *option_flags(opts)),
        capsys,
    )
    assert code == 1 and "bucket 'no-such-bucket-selkd' does not exist" in err and s3_endpoint.endpoint_url in err
    # an endpoint nobody listens on (one attempt, so the test is quick)
    dead = {**opts, "endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}}
    code, _, err = run(cache_main, ["info", s3_endpoint.url("e2e/options"), *option_flags(dead)], capsys)
    assert code == 1 and "cannot reach bucket" in err and "http://127.0.0.1:1" in err
    # no credentials anywhere
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_keys = {"endpoint_url": s3_endpoint.endpoint_url}
    code, _, err = run(cache_main, ["info", s3_endpoint.url("e2e/options"), *option_flags(no_keys)], capsys)
    assert code == 1 and "AWS_ACCESS_KEY_ID" in err, err
    # a prefix with no cache
    code, _, err = run(cache_main, ["info", s3_endpoint.url("e2e/nothing-here"), *option_flags(opts)], capsys)
    assert code == 1 and "no cache there" in err


def one_error_line(err: str, program: str) -> str:
    """The single line a failed command printed: ``PROGRAM: error: ...``, nothing else, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def auth_cache(s3_auth: AuthS3Endpoint, tiny_teacher_dir: Path, text_corpus_dir: Path) -> str:
    """A cache built on the authenticated endpoint by the "writer" user (whose key works)."""
    url = s3_auth.url("e2e/auth")
    argv = build_argv(tiny_teacher_dir, text_corpus_dir, url, *option_flags(s3_auth.options("writer")))
    assert cache_main(argv) == 0
    return url


def test_wrong_credentials_are_one_line_for_every_command(
    s3_auth: AuthS3Endpoint,
    auth_cache: str,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tiny_student_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """moto with IAM authentication on: a wrong secret (403 SignatureDoesNotMatch), an unknown key (403
    InvalidAccessKeyId) and a key no policy allows (403 AccessDenied) each give one line naming the
    store, the endpoint, the code and what to check (exit 1) for build, info, verify and training."""
    endpoint = s3_auth.endpoint_url
    wrong_secret = option_flags(s3_auth.options("writer", secret="not-the-secret"))
    unknown_key = option_flags(s3_auth.options("writer", key="AKIASELKDUNKNOWN0000"))
    rejected = "the S3 endpoint at {} rejected the credentials ({}: "
    new = s3_auth.url("e2e/never-written")

    code, _, err = run(cache_main, build_argv(tiny_teacher_dir, text_corpus_dir, new, *wrong_secret), capsys)
    line = one_error_line(err, "selkd-cache")
    assert code == 1 and line.startswith(f"selkd-cache: error: {new}: ")
    assert rejected.format(endpoint, "SignatureDoesNotMatch") in line and "AWS_PROFILE" in line
    for command, flags, expected in [
        ("info", unknown_key, rejected.format(endpoint, "InvalidAccessKeyId")),
        ("verify", wrong_secret, rejected.format(endpoint, "SignatureDoesNotMatch")),
        ("info", option_flags(s3_auth.options("nobody")), "access denied reading zarr.json at "),
    ]:
        code, _, err = run(cache_main, [command, auth_cache, *flags], capsys)
        line = one_error_line(err, "selkd-cache")
        assert code == 1 and f"{auth_cache}: " in line and expected in line, line
    assert "(AccessDenied: " in line and "bucket policy" in line

    # read-only credentials: reading works, building is refused before anything is written
    code, out, _ = run(cache_main, ["info", auth_cache, "--json", *option_flags(s3_auth.options("reader"))], capsys)
    assert code == 0 and json.loads(out)["parts_committed"] == 3
    reader = option_flags(s3_auth.options("reader"))
    code, _, err = run(cache_main, build_argv(tiny_teacher_dir, text_corpus_dir, new, *reader), capsys)
    line = one_error_line(err, "selkd-cache")
    assert code == 1 and "access denied writing a probe object" in line and "(AccessDenied: " in line

    # training, with the credentials from the AWS environment
    set_aws_env(monkeypatch, S3Endpoint(endpoint, s3_auth.bucket, {}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_auth.keys["writer"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code, _, err = run(train_main, train_argv(auth_cache, tiny_student_dir, tmp_path / "run"), capsys)
    line = one_error_line(err, "selkd-train")
    assert code == 1 and rejected.format(endpoint, "SignatureDoesNotMatch") in line

    # nothing was written under the new prefix by any refused build
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_auth.keys["writer"][1])
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
    assert fs.find(new.removeprefix("s3://")) == []


@pytest.mark.parametrize(
    "url, options, expected",
    [
        # Hugging Face's fsspec filesystem (HfFileSystem); its endpoint made unreachable on purpose
        (
            "hf://datasets/selkd/cache",
            {"endpoint": "http://127.0.0.1:1"},
            "cannot reach the server at http://127.0.0.1:1",
        ),
        ("hf://datasets/selkd/cache", {"endpoint": "https://selkd.invalid"}, "cannot reach the server at https://"),
        ("https://selkd.invalid/cache", {}, "cannot reach the server (ClientConnectorDNSError"),  # never resolves
        ("http://127.0.0.1:1/cache", {}, "cannot reach the server (ClientConnectorError"),  # refused
        ("oci://bucket@namespace/cache", {}, "the filesystem for this URL is not installed (Install ocifs"),
    ],
)
def test_unreachable_url_is_one_line_and_fast(
    url: str,
    options: dict[str, str],
    expected: str,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tiny_student_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A store URL this machine cannot reach (no network, a name that does not resolve, a refused
    connection, a filesystem that is not installed): one line within seconds, not minutes of retries."""
    flags = option_flags(options)
    for program, main, argv in [
        ("selkd-cache", cache_main, build_argv(tiny_teacher_dir, text_corpus_dir, url, *flags)),
        ("selkd-cache", cache_main, ["info", url, *flags]),
        ("selkd-cache", cache_main, ["verify", url, *flags]),
        ("selkd-train", train_main, train_argv(url, tiny_student_dir, tmp_path / "run", *flags)),
    ]:
        start = time.monotonic()
        code, _, err = run(main, argv, capsys)
        seconds = time.monotonic() - start
        line = one_error_line(err, program)
        assert code == 1 and line.startswith(f"{program}: error: {url}: ") and expected in line, line
        assert seconds < 10, f"{argv[0]} took {seconds:.1f} s"


def test_s3_data_with_wrong_credentials_or_endpoint_is_one_line(
    s3_auth: AuthS3Endpoint, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--data s3://...`` that cannot be listed (a wrong secret, an endpoint nobody serves) is one line
    naming the spec and what to check (exit 1), and no token store is left behind."""
    spec = s3_auth.url("data/corpus/")
    out = tmp_path / "tokens"
    for flags, expected in (
        (option_flags(s3_auth.options("writer", secret="not-the-secret")), "access denied ("),
        (
            option_flags({"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s"}),
            "cannot list it (EndpointConnectionError: ",
        ),
    ):
        argv = ["prepare", "--data", spec, "--tokenizer", str(tiny_teacher_dir), "--out", str(out), *flags]
        code, _, err = run(cache_main, argv, capsys)
        line = one_error_line(err, "selkd-cache")
        assert code == 1 and line.startswith(f"selkd-cache: error: {spec.rstrip('/')}: "), line
        assert expected in line and "; check the " in line, line
        assert not out.exists() or not any(out.iterdir())
