"""`moelens.load` on checkpoints saved with ``save_pretrained`` like hub checkpoints: dtypes, placement,
pass-through keyword arguments, router weights missing from the safetensors file, and hub ids while offline."""

from __future__ import annotations

import importlib.util
import shutil
import time

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import moelens as cli

import moelens
from moelens.adapters import find_routers
from moelens.errors import InputError
from moelens.tiny import tiny_model, tiny_tokenizer


def save_checkpoint(folder, model_type: str):
    model, _ = tiny_model(model_type, seed=1)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "mixtral"
    return folder, save_checkpoint(folder, "mixtral")


def without(src, dst, drop) -> list[str]:
    """A copy of checkpoint ``src`` at ``dst`` whose safetensors file lacks the keys ``drop`` selects."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    dropped = [key for key in weights if drop(key)]
    save_file({k: v for k, v in weights.items() if k not in dropped}, dst / "model.safetensors", metadata={"format": "pt"})
    return dropped


@pytest.mark.parametrize("dtype, expected", [
    (torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), ("float32", torch.float32), ("fp32", torch.float32),
    ("torch.bfloat16", torch.bfloat16), ("auto", torch.float32),  # auto: as saved
])
def test_dtype_spellings(checkpoint, dtype, expected) -> None:
    model, tokenizer = moelens.load(checkpoint[0], dtype=dtype)
    assert model.dtype == expected and not model.training and len(tokenizer) <= model.config.vocab_size


def test_bad_dtype_and_unsafe_options_are_refused(checkpoint) -> None:
    with pytest.raises(InputError, match="dtype must be one of"):
        moelens.load(checkpoint[0], dtype="float8")
    with pytest.raises(InputError, match="only from .safetensors"):
        moelens.load(checkpoint[0], use_safetensors=False)
    with pytest.raises(InputError, match="not both"):
        moelens.load(checkpoint[0], device="cpu", device_map="cpu")


def test_weights_placement_and_pass_through_kwargs(checkpoint) -> None:
    folder, saved = checkpoint
    model, _ = moelens.load(folder, device_map="cpu", attn_implementation="eager", revision=None)
    assert model.device.type == "cpu" and model.config._attn_implementation == "eager"
    for ours, theirs in zip(find_routers(model).sites, find_routers(saved).sites):
        assert torch.equal(ours.logit_weight, theirs.logit_weight)
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(InputError, match="needs the accelerate package"):
            moelens.load(folder, device_map="auto")
    else:
        assert moelens.load(folder, device_map={"": "cpu"})[0].device.type == "cpu"


@pytest.mark.parametrize("model_type, router_key", [
    ("mixtral", lambda k: k.endswith("gate.weight") and "experts" not in k),
    ("qwen2_moe", lambda k: "shared_expert_gate" in k),  # the gate of the shared expert routes too
])
def test_missing_router_weights_are_refused_unless_allowed(tmp_path, model_type, router_key) -> None:
    save_checkpoint(tmp_path / "full", model_type)
    dropped = without(tmp_path / "full", tmp_path / "broken", router_key)
    assert dropped
    with pytest.raises(InputError, match="router parameter.*--allow-random-router") as info:
        moelens.load(tmp_path / "broken")
    assert "\n" not in str(info.value) and f"{len(dropped)} router" in str(info.value)
    model, _ = moelens.load(tmp_path / "broken", allow_missing_router_weights=True)
    assert find_routers(model).sites


def test_missing_non_router_weights_do_not_refuse(tmp_path, checkpoint) -> None:
    assert without(checkpoint[0], tmp_path / "no-norm", lambda k: k == "model.norm.weight")
    assert moelens.load(tmp_path / "no-norm")[0] is not None


def test_uncached_hub_id_fails_at_once_while_offline(monkeypatch) -> None:
    """The network is unreachable here: one clear line at once, not transformers' ~30 s of retries."""
    start = time.monotonic()
    with pytest.raises(InputError, match="some-org/not-cached-model") as info:
        moelens.load("some-org/not-cached-model")
    assert time.monotonic() - start < 5 and "\n" not in str(info.value)
    assert "cannot reach" in str(info.value) or "HF_HUB_OFFLINE" in str(info.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        moelens.load("some-org/not-cached-model")
    with pytest.raises(InputError, match="not a valid hub id|neither a local model folder"):
        moelens.load("not a model!")
    with pytest.raises(InputError, match="does not exist"):
        moelens.load("some/missing/folder")


def test_cached_hub_id_loads_without_the_network(tmp_path, checkpoint) -> None:
    """A model in the Hugging Face cache layout loads at once while the hub cannot be reached."""
    repo = tmp_path / "models--some-org--cached-moe"
    commit = "0" * 40
    shutil.copytree(checkpoint[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    start = time.monotonic()
    model, _ = moelens.load("some-org/cached-moe", cache_dir=tmp_path, revision="main")
    assert time.monotonic() - start < 10 and find_routers(model).n_experts == find_routers(checkpoint[1]).n_experts


def test_cli_loading_options(tmp_path, checkpoint) -> None:
    db = str(tmp_path / "t.duckdb")
    out = cli("record", str(checkpoint[0]), "--text", "hello", "--device-map", "cpu", "--dtype", "bf16", "--db", db).stdout
    assert "run 1 complete" in out
    assert moelens.TraceStore(db).run(1)["dtype"] == "bfloat16"
    proc = cli("record", str(checkpoint[0]), "--text", "x", "--device-map", "{bad", "--db", db, check=False)
    assert proc.returncode == 1 and "is not a JSON object" in proc.stderr
