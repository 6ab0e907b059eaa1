"""Loading a causal LM and its tokenizer.

Everything here is shared by the cache builder (the teacher) and the trainer (the student), so the
loaders do not assume a role: ``frozen=True`` (the default, for teachers) puts the model in eval mode
without gradients; students pass ``frozen=False``.

Failures a user can cause (a wrong path, a directory that is not a saved model, an encoder such as
BERT, missing tokenizer files, a hub id without network) raise :class:`ModelError` with a one-line
message that names the path and says what to do, instead of a transformers traceback.

The fingerprints that tie a cache to them are in :mod:`selkd.cache.fingerprints`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from selkd.cache.errors import SelkdError

__all__ = [
    "DTYPE_NAMES",
    "ModelError",
    "load_causal_lm",
    "load_tokenizer",
    "parse_device_map",
    "resolve_device",
    "resolve_dtype",
    "vocab_size",
]

T = TypeVar("T")


class ModelError(SelkdError):
    """A user-facing model/tokenizer loading error: the message names the path or id and what to do."""


# ----------------------------------------------------------------------------- device / dtype

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` pick CUDA when present, else CPU, so the same command runs on a laptop and a
    GPU box. An explicit CUDA device without CUDA fails here rather than deep inside ``.to()``."""
    if isinstance(device, torch.device):
        dev = device
    elif device is None or str(device).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {str(dev)!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    """``None``/``"auto"`` give bfloat16 on CUDA (float16 on GPUs without bf16) and float32 on CPU, where
    half precision is slow and bf16 matmuls lose accuracy for no speed gain."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ModelError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPE_NAMES)}")
        return dtype
    if dtype is None or str(dtype).strip().lower() in ("", "auto"):
        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ModelError(f"unknown dtype {dtype!r}; use 'auto' or one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# accelerate's named placements: every layer on some GPU, in proportion to free memory ("auto",
# "balanced"), GPU 0 kept light ("balanced_low_0"), or filled in order ("sequential").
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str) -> str | dict[str, Any]:
    """``--teacher-device-map``: one of :data:`DEVICE_MAP_NAMES`, or a JSON object mapping module names
    to a GPU index, ``"cpu"`` or ``"disk"`` (``{"model.layers.0": 0, ..., "lm_head": 1}``). ValueError
    with the reason otherwise."""
    text = text.strip()
    if not text.startswith("{"):
        if text not in DEVICE_MAP_NAMES:
            raise ValueError(f"{text!r} is not one of {', '.join(DEVICE_MAP_NAMES)} nor a JSON object")
        return text
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, str)) for v in value.values()):
        raise ValueError("a JSON device map maps module names to a GPU index, 'cpu' or 'disk'")
    return value


def _device_map_kwargs(device_map: str) -> dict[str, Any]:
    """from_pretrained's arguments that spread a model over devices with accelerate: offloaded weights
    go to a temporary folder (removed with the model), never into the model's directory."""
    if importlib.util.find_spec("accelerate") is None:
        raise ModelError(
            "--teacher-device-map needs the accelerate package; install it with pip install 'selkd[multigpu]'"
        )
    parsed = parse_device_map(device_map)
    gpus = torch.cuda.device_count()
    missing = (
        sorted({v for v in parsed.values() if isinstance(v, int) and v >= gpus}) if isinstance(parsed, dict) else []
    )
    if missing:
        raise ModelError(
            f"--teacher-device-map names GPU {', '.join(map(str, missing))} but this machine has {gpus}; "
            "map the modules to the GPUs it has (0 .. N-1), 'cpu' or 'disk', or use auto"
        )
    return {"device_map": parsed, "offload_folder": tempfile.mkdtemp(prefix="selkd-offload-")}


# ----------------------------------------------------------------------------- locating a model

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``; rejects absolute/relative paths ('/', './', '~', '..')."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _locate(name_or_path: str | Path, what: str) -> tuple[str, bool]:
    """Return ``(source, is_local)``. A path that exists must be a directory; one that does not exist is
    only accepted when it could be a hub id, so a typo in a local path fails with a path message."""
    raw = str(name_or_path)
    if not raw.strip():
        raise ModelError(f"empty {what} path; pass a local directory made by save_pretrained")
    path = Path(raw).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{raw} is a file; pass the {what} directory written by save_pretrained (config.json, "
                "weights and tokenizer files)"
            )
        return str(path), True
    if not _looks_like_hub_id(raw):
        raise ModelError(
            f"{raw} does not exist and is not a hub id like 'org/name'; pass an existing local {what} "
            "directory made by save_pretrained"
        )
    return raw, False


def _hub_reachable() -> bool:
    """A cheap DNS probe so that an offline machine fails at once instead of after the hub client's
    retries with back-off (~25 s)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _unreachable(name: str) -> ModelError:
    return ModelError(
        f"could not load {name}: not a local directory and the hub is unreachable; pass a local path "
        "(it is not in the local hub cache either)"
    )


def _from_hub(load: Callable[..., T], name: str, what: str, **kwargs: Any) -> T:
    """Try the local hub cache first (no network), then the hub itself if it can be reached."""
    try:
        return load(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise _unreachable(name)
    try:
        return load(name, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load {what} {name} from the hub: {_first_line(e)}") from e


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or a hub id, with errors that name the path.

    Custom tokenizer code from a repository runs only when ``trust_remote_code`` is asked for."""
    source, local = _locate(name_or_path, "tokenizer")
    if local:
        if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(
                f"no tokenizer files in {source} (looked for tokenizer.json, tokenizer_config.json, "
                f"vocab.json, tokenizer.model, ...); save one there with tokenizer.save_pretrained(...) "
                "or pass the tokenizer's own directory"
            )
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(_tokenizer_error(source, e, trust_remote_code)) from e
    try:
        return _from_hub(AutoTokenizer.from_pretrained, source, "tokenizer", trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise ModelError(_tokenizer_error(source, e, trust_remote_code)) from e


def _tokenizer_error(source: str, e: BaseException, trust_remote_code: bool) -> str:
    if "trust_remote_code" in str(e) and not trust_remote_code:
        return (
            f"the tokenizer in {source} needs custom code from its repository; pass --trust-remote-code "
            "(trust_remote_code=True in Python) only if you trust it"
        )
    return f"could not load a tokenizer from {source}: {_first_line(e)}"


# ----------------------------------------------------------------------------- model


def _raw_model_type(source: str, local: bool) -> str | None:
    if not local:
        return None
    try:
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _not_causal(source: str, model_type: str | None, why: str) -> ModelError:
    return ModelError(
        f"{source} is not a causal language model (model_type={model_type}): {why}; pass a decoder-only "
        "model such as Llama, Qwen or GPT-2"
    )


def _check_causal(hf_config: PretrainedConfig, source: str, trust_remote_code: bool) -> None:
    """AutoModelForCausalLM accepts BERT-like encoders (as ``BertLMHeadModel``) and encoder-decoders'
    decoders; neither is a left-to-right LM whose logits a student should match, so reject them here."""
    model_type = getattr(hf_config, "model_type", None)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise _not_causal(source, model_type, "it is an encoder-decoder model")
    auto_map = getattr(hf_config, "auto_map", None) or {}
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in auto_map
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise _not_causal(source, model_type, "transformers has no causal-LM class for it")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False):
        raise _not_causal(source, model_type, "it is a bidirectional (masked-LM) encoder")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 takes ``dtype=``; older versions only know ``torch_dtype=``."""
    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def checkpoint_dtype(source: str, trust_remote_code: bool) -> torch.dtype | None:
    """The dtype a model's config.json declares (``dtype``, or ``torch_dtype`` as transformers before 4.56
    wrote it); None when it declares none, one selkd does not know, or the config cannot be read (the
    model's loader then says what is wrong with ``source``, in one line)."""
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPE_NAMES.get(str(declared).removeprefix("torch."))


def load_causal_lm(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    frozen: bool = True,
    device_map: str | None = None,
) -> PreTrainedModel:
    """Load a decoder-only LM onto ``device`` in ``dtype`` (both resolved by :func:`resolve_device` and
    :func:`resolve_dtype`), or, with ``device_map`` (:func:`parse_device_map`), its layers spread over
    the devices accelerate's map names (a teacher larger than one GPU); ``device`` then only picks the
    dtype.

    ``frozen=True`` (teachers) sets eval mode and turns gradients off, so the teacher neither stores
    activations for backward nor gets updated by mistake; students pass ``frozen=False`` and get the
    model as transformers returns it. The config is checked before any weights are read, so a wrong
    directory fails in milliseconds."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, local = _locate(name_or_path, "model")
    if local and not (Path(source) / "config.json").is_file():
        raise ModelError(
            f"{source} has no config.json, so it is not a saved model directory; pass the directory that "
            "model.save_pretrained(...) wrote"
        )

    try:
        if local:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        else:
            config = _from_hub(AutoConfig.from_pretrained, source, "model", trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        model_type = _raw_model_type(source, local)
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelError(
                f"{source} needs custom model code from its repository (model_type={model_type}); pass "
                "--trust-remote-code (trust_remote_code=True) only if you trust it"
            ) from e
        raise ModelError(f"could not read the config of {source} (model_type={model_type}): {_first_line(e)}") from e
    except OSError as e:
        raise ModelError(f"could not read {source}/config.json: {_first_line(e)}") from e

    _check_causal(config, source, trust_remote_code)

    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": trust_remote_code, **_dtype_kwarg(dt)}
    if device_map is None:
        model = _load_weights(source, local, config, kwargs).to(dev)
    else:
        kwargs.update(_device_map_kwargs(device_map))
        folder = kwargs["offload_folder"]
        try:
            model = _load_weights(source, local, config, kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def _load_weights(source: str, local: bool, config: PretrainedConfig, kwargs: dict[str, Any]) -> PreTrainedModel:
    """from_pretrained with ``kwargs``, its failures as ModelError lines naming ``source``."""
    try:
        if local:
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)
        return _from_hub(AutoModelForCausalLM.from_pretrained, source, "model", **kwargs)
    except (ValueError, RuntimeError) as e:  # RuntimeError: a map naming a GPU this machine lacks
        if "device_map" in kwargs:
            raise ModelError(f"could not place {source} with --teacher-device-map: {_first_line(e)}") from e
        if isinstance(e, RuntimeError):
            raise
        raise _not_causal(source, config.model_type, _first_line(e)) from e
    except OSError as e:
        raise ModelError(
            f"could not load the weights in {source}: {_first_line(e)}; the directory needs the "
            "*.safetensors (or pytorch_model.bin) files that save_pretrained writes"
        ) from e


def vocab_size(model: PreTrainedModel) -> int:
    """The logits dimension (the head's rows). It can exceed ``len(tokenizer)``: Qwen and others pad the
    output layer to a multiple of 64/128 (Qwen2.5-7B: 152,064 rows, Qwen2.5-0.5B: 151,936, one tokenizer of
    151,665), so teacher and student heads may differ; the classes both share are :func:`num_classes`."""
    emb = model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def num_classes(tokenizer: Any) -> int:
    """The number of real classes: ``len(tokenizer)`` (added tokens included). Ids ``0 .. C - 1`` are the
    tokens; head rows at or above it are padding, never a real token, so targets never point at them and
    a head (teacher or student) needs at least this many rows."""
    return len(tokenizer)
