"""Load a transformers MoE model and tokenizer the way a hub checkpoint expects, and safely.

Safe: weights only from safetensors, no remote code unless asked, and a checkpoint whose router weights
transformers reported missing (so they were randomly initialised: a renamed module, a truncated download, the
wrong architecture class) is refused, because every routing it records would be noise that looks like data.
Fast to fail: a hub id that is neither a local folder nor in the local cache, while the hub cannot be reached,
fails at once instead of after transformers' ~30 s of retries.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moelens.errors import InputError, MoelensError

#: Spellings of each dtype that moelens (and the CLI's ``--dtype``) accepts, besides a ``torch.dtype``.
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
DTYPES = tuple(DTYPE_ALIASES)

#: ``from_pretrained`` keyword arguments (besides ``revision``) that also decide which config and tokenizer files are read.
_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


def load_model(
    name_or_path: str | Path,
    *,
    dtype: Any = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_missing_router_weights: bool = False,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Return ``(model.eval(), tokenizer)`` for a local folder or a hub id.

    ``dtype``: a ``torch.dtype``, ``"auto"`` (the checkpoint's), ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
    ``"float16"``/``"fp16"``. ``device_map`` (``"auto"``, ``"cpu"``, ``{"": 0}``, ...) is passed to transformers
    (``"auto"`` and dicts need the ``accelerate`` package); without it the model is moved to ``device`` (default
    cpu). Other keyword arguments (``attn_implementation``, ``cache_dir``, ``token``, ...) go to
    ``from_pretrained``. The model is checked for MoE layers and for missing router weights right away, so a
    dense or broken checkpoint fails here rather than after a long recording has started.
    """
    if from_pretrained_kwargs.pop("use_safetensors", True) is False:
        raise InputError("moelens loads weights only from .safetensors files; use_safetensors=False is not allowed")
    from_pretrained_kwargs.pop("output_loading_info", None)  # always on: it is how missing routers are found
    dtype = from_pretrained_kwargs.pop("torch_dtype", dtype)  # transformers' older name for dtype
    placement, move_to = _placement(device, device_map)
    source = str(name_or_path)
    common = {"trust_remote_code": trust_remote_code, "revision": revision,
              **{k: from_pretrained_kwargs.pop(k) for k in _HUB_KWARGS if k in from_pretrained_kwargs}}
    if not _is_local(source):  # before torch and transformers load: a hub id while offline fails at once
        common["local_files_only"] = common.get("local_files_only") or _hub_files_only_from_cache(
            source, revision, common.get("cache_dir"))
    torch_dtype = resolve_dtype(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from moelens.adapters import find_routers
    from moelens.threads import apply_thread_policy

    apply_thread_policy()
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as exc:
        raise MoelensError(
            f"could not load a model config from {source!r}: {_first_line(exc)} "
            "Give a local model folder (with config.json) or a hub id while online."
        ) from exc
    except ValueError as exc:
        hint = "" if trust_remote_code else " If the model ships its own code and you trust it, add --trust-remote-code."
        raise MoelensError(f"transformers does not know this model: {_first_line(exc)}.{hint}") from exc
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model, loading_info = auto.from_pretrained(
            source, config=config, dtype=torch_dtype, use_safetensors=True, output_loading_info=True,
            **placement, **common, **from_pretrained_kwargs)
    except OSError as exc:
        raise MoelensError(
            f"could not load safetensors weights from {source!r}: {_first_line(exc)} "
            "moelens loads weights only from .safetensors files (no pickled .bin checkpoints)."
        ) from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"transformers could not load {source!r} as asked: {_first_line(exc)}") from exc
    if move_to is not None:
        model = model.to(move_to)
    model = model.eval()
    info = find_routers(model)  # raises NotMoEError with the supported types
    missing = missing_router_weights(model, info, loading_info.get("missing_keys", ()))
    if missing and not allow_missing_router_weights:
        raise InputError(
            f"{source}: transformers found no weights for {len(missing)} router parameter(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}) and initialised them at random, so the recorded routing would be "
            "noise. Check the checkpoint (a wrong architecture or renamed modules?), or pass "
            "allow_missing_router_weights=True / --allow-random-router to record it anyway."
        )
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return model, tokenizer


def resolve_dtype(dtype: Any) -> Any:
    """``"auto"`` or the ``torch.dtype`` that ``dtype`` (a torch.dtype or one of `DTYPES`) names."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)} or a torch.dtype, not {dtype!r}")
    return name if name == "auto" else getattr(torch, name)


def parse_device_map(text: str | None) -> str | dict | None:
    """The CLI's ``--device-map``: ``auto``, ``cpu``, ``cuda:0``, ... or a JSON object (``{"": 0}``)."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--device-map: {text!r} is not a JSON object ({exc.msg}); pass auto, cpu, cuda:0 or "
                         "JSON like '{\"\": 0}'") from exc
    return value


def missing_router_weights(model: Any, info: Any, missing_keys: Any) -> list[str]:
    """The missing checkpoint keys that belong to a router (or a shared-expert gate) of ``info``."""
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = {site.name for site in info.sites}
    prefixes |= {names[id(site.shared_gate)] for site in info.sites if site.shared_gate is not None}
    return sorted(key for key in missing_keys if any(key.startswith(prefix + ".") for prefix in prefixes))


def _placement(device: str | None, device_map: str | dict | None) -> tuple[dict[str, Any], str | None]:
    """``({"device_map": ...}, None)`` for transformers to place the model, or ``({}, device)`` to move it after loading."""
    if device_map is None:
        return {}, device or "cpu"
    if device is not None:
        raise InputError("pass device or device_map, not both (device_map places the model while it loads)")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        if isinstance(device_map, str) and device_map != "auto":
            return {}, device_map  # one device: loading then moving is the same placement, and needs no accelerate
        raise InputError(f"device_map={device_map!r} needs the accelerate package (pip install accelerate); "
                         "or pass one device (--device cuda:0)")
    return {"device_map": device_map}, None


def _is_local(source: str) -> bool:
    """Whether ``source`` names a local folder; a path-like name that does not exist is an error, not a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return True
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise InputError(f"model folder {source} does not exist")
    return False


def _hub_files_only_from_cache(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> bool:
    """Whether to read ``repo_id`` from the local cache only; fails at once when it is neither cached nor reachable.

    transformers retries an unreachable hub for about 30 seconds before it gives up or falls back to the cache;
    a cached model loads offline at once, and an uncached one while offline gets one line right away.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"{repo_id!r} is neither a local model folder nor a valid hub id ({_first_line(exc)})") from exc
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise InputError(f"{repo_id} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                         "set: download it once while online, or pass the path of a local model folder")
    if _hub_reachable(constants.ENDPOINT):
        return False
    if cached:
        return True
    raise InputError(f"cannot reach {constants.ENDPOINT} to download {repo_id}, and it is not in the Hugging Face "
                     "cache: connect to the network, or pass the path of a local model folder")


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or its proxy), no retries: enough to tell offline from online."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (transformers' messages run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
