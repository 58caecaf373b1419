"""Load a transformers MoE model and tokenizer safely (safetensors, no remote code unless asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelens.errors import MoelensError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
               revision: str | None = None) -> tuple[Any, Any]:
    """Return ``(model.eval(), tokenizer)`` for a local folder or a hub id.

    The model is checked for MoE layers right away, so a dense model fails here with the list of
    supported types rather than after a long recording has started.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from moelens.adapters import find_routers
    from moelens.threads import apply_thread_policy

    apply_thread_policy()
    if dtype not in DTYPES:
        raise MoelensError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    source = str(name_or_path)
    local = Path(source)
    if (source.startswith((".", "/", "~")) or local.exists()) and not local.expanduser().exists():
        raise MoelensError(f"model folder {source} does not exist")
    common = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as exc:
        raise MoelensError(
            f"could not load a model config from {source!r}: {exc}\n"
            "Give a local model folder (with config.json) or a hub id while online."
        ) from exc
    except ValueError as exc:
        hint = "" if trust_remote_code else " If the model ships its own code and you trust it, add --trust-remote-code."
        raise MoelensError(f"transformers does not know this model: {exc}.{hint}") from exc
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = auto.from_pretrained(source, config=config, dtype=torch_dtype, use_safetensors=True, **common)
    except OSError as exc:
        raise MoelensError(
            f"could not load safetensors weights from {source!r}: {exc}\n"
            "moelens loads weights only from .safetensors files (no pickled .bin checkpoints)."
        ) from exc
    model = model.to(device).eval()
    find_routers(model)  # raises NotMoEError with the supported types
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return model, tokenizer
