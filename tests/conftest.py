"""Shared, session-scoped fixtures: tiny offline models, tokenizers and corpora.

Everything is built once per test session from the interpreter's standard library (no hub, no
downloads) by ``tools/make_tiny.py``; the whole setup takes a few seconds. Fixtures return directories
laid out like any Hugging Face checkpoint, so tests exercise the same loading path as real models.
Treat them as read-only: copy a directory (``shutil.copytree``) before modifying it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parent.parent
_TOOLS = str(REPO_ROOT / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

import make_tiny  # noqa: E402  (needs tools/ on sys.path)

_TESTS = str(REPO_ROOT / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from s3 import AuthS3Endpoint, S3Endpoint, moto_s3, moto_s3_authenticated, set_aws_env  # noqa: E402  (tests/s3.py)

TINY_VOCAB = 384
OTHER_VOCAB = 320
BIG_VOCAB = 151_936  # Qwen2/Qwen3 output layer size
CORPUS_TOKENS = 60_000


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root; ``tools/`` is on ``sys.path`` (``import make_tiny`` works in tests)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def stdlib_sample() -> list[str]:
    """~400 KB of standard-library source: the tiny tokenizer's training text and the corpus source."""
    return make_tiny.stdlib_texts(max_bytes=400_000)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_sample: list[str]) -> Path:
    """A byte-level BPE tokenizer with 384 tokens (eos=bos ``<|endoftext|>``, pad ``<|pad|>``, ChatML
    chat template), saved with ``save_pretrained``."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny.train_bpe_tokenizer(stdlib_sample, TINY_VOCAB, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`tiny_tokenizer_dir`, loaded once (do not mutate it)."""
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def save_tiny_model(
    out: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    vocab: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_pos: int = 1024,
    seed: int = 0,
    tie: bool = False,
    arch: str = "llama",
) -> Path:
    """A randomly initialised tiny causal LM (``arch``: ``"llama"`` or ``"qwen2"``) saved into ``out`` like
    any Hugging Face checkpoint, with ``tokenizer`` (whose special ids it takes) next to it if given.
    ``vocab`` defaults to ``len(tokenizer)``; the same arguments always give the same weights, and the
    global torch RNG is left alone."""
    ids = {} if tokenizer is None else make_tiny.special_ids(tokenizer)
    vocab = len(tokenizer) if vocab is None and tokenizer is not None else vocab
    if vocab is None:
        raise ValueError("give a tokenizer or a vocab size")
    if arch == "llama":
        model = make_tiny.make_llama(vocab, hidden, layers, heads, kv_heads, intermediate, max_pos, seed, tie, **ids)
    elif arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate if intermediate is not None else 4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            max_position_embeddings=max_pos,
            tie_word_embeddings=tie,
            **ids,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}: 'llama' or 'qwen2'")
    return make_tiny.save_model(model, tokenizer, out)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Path]:
    """The factory of tiny saved models: ``tiny_model(out_dir, tokenizer, vocab=..., hidden=..., layers=...,
    seed=..., arch="llama" | "qwen2")`` (see :func:`save_tiny_model`) returns ``out_dir``."""
    return save_tiny_model


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerBase) -> Path:
    """Llama teacher: vocab = len(tokenizer) = 384, hidden 64, 2 layers, seed 0, random init; the
    tokenizer is saved next to it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), tiny_tokenizer, hidden=64, layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerBase) -> Path:
    """Llama student: same tokenizer and vocab as the teacher, hidden 32, 1 layer, seed 1."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_student"), tiny_tokenizer, hidden=32, layers=1, seed=1)


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_sample: list[str]) -> Path:
    """A Llama (hidden 32, 1 layer) with a DIFFERENT tokenizer (320 tokens, trained on upper-cased
    text), for tokenizer-mismatch tests."""
    other_text = [t.upper() for t in stdlib_sample[: max(1, len(stdlib_sample) // 2)]]
    tok = make_tiny.train_bpe_tokenizer(other_text, OTHER_VOCAB)
    return save_tiny_model(tmp_path_factory.mktemp("other_tokenizer_model"), tok, hidden=32, layers=1, seed=2)


@pytest.fixture(scope="session")
def big_vocab_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A teacher whose logits have 151,936 classes while its (tiny) tokenizer has 384 tokens, like
    Qwen3's padded output layer. Hidden 16, 1 layer, tied embeddings (~10 MB)."""
    out = tmp_path_factory.mktemp("big_vocab_teacher")
    return save_tiny_model(out, tiny_tokenizer, vocab=BIG_VOCAB, hidden=16, layers=1, heads=4, seed=3, tie=True)


@pytest.fixture(scope="session")
def text_corpus_dir(
    tmp_path_factory: pytest.TempPathFactory,
    stdlib_sample: list[str],
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> Path:
    """Three ``part-*.jsonl`` files of ``{"text": ...}`` rows (stdlib source cut at line boundaries into
    pieces of at most 2,000 characters), about 60k tokens in total with the tiny tokenizer. Rows are
    dealt round-robin, so every file mixes short and long rows."""
    out = tmp_path_factory.mktemp("text_corpus")
    rows: list[str] = []
    n_tokens = 0
    for text in stdlib_sample:
        for piece in make_tiny.chunk_text(text, 2000):
            rows.append(piece)
            n_tokens += len(tiny_tokenizer(piece, add_special_tokens=False)["input_ids"])
            if n_tokens >= CORPUS_TOKENS:
                break
        if n_tokens >= CORPUS_TOKENS:
            break
    n_files = 3
    for i in range(n_files):
        make_tiny.write_jsonl(out / f"part-{i:02d}.jsonl", rows[i::n_files])
    return out


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A tiny BERT encoder (not a causal LM) saved with ``save_pretrained``, plus the tiny tokenizer, so
    that loading it fails on the model type and nothing else."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    out = tmp_path_factory.mktemp("bert")
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


# --- S3: a real endpoint (moto's server mode) on 127.0.0.1, shared by the whole session ---------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """(endpoint_url, bucket, storage_options); give each test its own prefix: ``s3_endpoint.url(...)``."""
    with moto_s3() as endpoint:  # skips cleanly if moto/s3fs/boto3 are missing
        yield endpoint


@pytest.fixture
def aws_env(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """The same endpoint through the usual AWS environment variables only."""
    set_aws_env(monkeypatch, s3_endpoint)
    return s3_endpoint


@pytest.fixture(scope="session")
def s3_auth() -> Iterator[AuthS3Endpoint]:
    """An S3 endpoint that checks signatures and IAM policies (its own moto process): users "writer",
    "reader" and "nobody"; ``s3_auth.options(user, secret="wrong")`` for a wrong secret."""
    with moto_s3_authenticated() as endpoint:
        yield endpoint


QWEN25_TOKENS = 151_665  # len(tokenizer) of Qwen2.5; its 0.5B head has BIG_VOCAB rows, its 7B head 152,064


@pytest.fixture(scope="session")
def qwen_like_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher shaped like Qwen2.5-0.5B's output: a 151,665-token tokenizer (word-level: ``w3`` ..
    ``w151664``, everything else is ``<unk>``) and a head padded to 151,936 rows. Hidden 16, 1 layer, tied."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, QWEN25_TOKENS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>"
    )
    out = tmp_path_factory.mktemp("qwen_like_teacher")
    return save_tiny_model(out, tok, vocab=BIG_VOCAB, hidden=16, layers=1, heads=4, seed=3, tie=True)
