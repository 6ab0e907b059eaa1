"""The fingerprints that tie a cache (or a token store) to the tokenizer and model it was made with.

They exist so that a cache written with one teacher cannot silently be read against a different
tokenizer or model: :func:`tokenizer_fingerprint` covers what the ids *mean* (vocabulary, added tokens,
the EOS id), :func:`config_hash` covers the architecture hyperparameters.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["FINGERPRINT_PREFIX", "config_hash", "same_tokenizer", "tokenizer_fingerprint"]

# ----------------------------------------------------------------------------- tokenizer

#: Prefix of the current fingerprint version. Caches written before it store an unprefixed sha256
#: (version 1, which also hashed the bos/pad/unk ids); :func:`same_tokenizer` still reads those.
FINGERPRINT_PREFIX = "v2:"


def _fingerprint_payload(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    vocab = sorted((str(t), int(i)) for t, i in tok.get_vocab().items())
    added = sorted(
        (int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", False)))
        for i, t in getattr(tok, "added_tokens_decoder", {}).items()
    )
    return {"vocab": vocab, "added": added}


def _digest(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """``"v2:"`` + sha256 hex of what the token ids in a cache *mean*: the full vocabulary, the added
    tokens (id, text, special flag) and the EOS id, which separates documents in the packed stream.

    A cache stores token ids and per-id teacher probabilities, so two tokenizers are interchangeable for
    it exactly when these agree. Left out on purpose: how a tokenizer class fills defaults the cache
    never uses (Qwen2's class sets unk to ``<|endoftext|>``, the generic one leaves it unset, for the
    same tokenizer.json), bos (documents are tokenized without special tokens), pad (only fills masked
    positions of a batch), and serialization details (strip flags, padding side, chat template)."""
    payload = {**_fingerprint_payload(tok), "eos_id": tok.eos_token_id}
    return FINGERPRINT_PREFIX + _digest(payload)


def _fingerprint_v1(tok: PreTrainedTokenizerBase) -> str:
    """The fingerprint of caches written before version 2: it also covered the bos/pad/unk ids."""
    special = {name: getattr(tok, f"{name}_token_id", None) for name in ("eos", "bos", "pad", "unk")}
    return _digest({**_fingerprint_payload(tok), "special_ids": special})


def same_tokenizer(stored: str, tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok`` matches a fingerprint stored in a cache header, computed the way that fingerprint
    was (version 1 caches keep their stricter comparison: rebuild a cache to get the current one)."""
    if stored.startswith(FINGERPRINT_PREFIX):
        return stored == tokenizer_fingerprint(tok)
    return stored == _fingerprint_v1(tok)


# ----------------------------------------------------------------------------- model config

# Keys that change with the environment or runtime flags but not with the function the model computes.
_VOLATILE_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "_experts_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
    }
)


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_hash(model_or_config: PreTrainedModel | PretrainedConfig) -> str:
    """sha256 hex of the model config (all values, not the diff to defaults) without volatile keys.

    It identifies the architecture a cache was made with: the dtype it was loaded in, its path and the
    transformers version do not change it; ``architectures`` is kept. It is not a hash of the weights:
    two checkpoints of the same architecture share it. Default-valued fields added by newer transformers
    versions can change it."""
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"config_hash needs a PreTrainedModel or PretrainedConfig, got {type(config).__name__}")
    data = _strip_volatile(json.loads(config.to_json_string(use_diff=False)))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
