"""Train the demo model from scratch on CPU: tokenizer, model, early checkpoint, final model.

``python -m moelens.demo.train`` rewrites ``moelens/demo/model`` and ``moelens/demo/checkpoints/early``
(~10 minutes on one thread for 600 steps). The run is seeded: on the same machine two runs give identical
weights; across machines and library versions expect close, not equal, numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import OlmoeForCausalLM, PreTrainedTokenizerFast

from moelens.demo import DOMAINS, load_corpus
from moelens.demo.model import BALANCE_COEF, new_model, per_layer_balance_loss
from moelens.demo.tokenizer import EOS_ID, MAX_LENGTH, train_tokenizer

BATCH_SIZE = 16
SEQ_LEN = MAX_LENGTH
LR = 3e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 50
MIN_LR_RATIO = 0.1
CLIP_NORM = 1.0
#: Where the early checkpoint falls, as a share of the steps (the issue asks for 10-20 %).
EARLY_SHARE = 0.15


@dataclass
class TrainReport:
    """What a run did; also written as ``training.json`` next to each saved checkpoint."""

    seed: int
    steps: int
    step: int
    tokens_seen: int
    seconds: float
    lm_loss: list[float]
    balance_loss: list[float]


def domain_streams(tokenizer: PreTrainedTokenizerFast, docs: list[dict]) -> list[torch.Tensor]:
    """Per domain (in DOMAINS order), the documents' tokens joined by EOS into one stream."""
    by_domain: dict[str, list[int]] = {d: [] for d in DOMAINS}
    encoded = tokenizer([doc["text"] for doc in docs], verbose=False)["input_ids"]
    for doc, ids in zip(docs, encoded):
        by_domain[doc["domain"]].extend(ids + [EOS_ID])
    return [torch.tensor(by_domain[d], dtype=torch.long) for d in DOMAINS]


def sample_batch(streams: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Random SEQ_LEN-token windows, each from a uniformly drawn domain (small domains are upsampled)."""
    domains = torch.randint(len(streams), (BATCH_SIZE,), generator=gen).tolist()
    rows = []
    for d in domains:
        start = int(torch.randint(len(streams[d]) - SEQ_LEN + 1, (1,), generator=gen))
        rows.append(streams[d][start : start + SEQ_LEN])
    return torch.stack(rows)


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_RATIO of the peak."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: OlmoeForCausalLM) -> torch.optim.AdamW:
    """AdamW with weight decay only on matrices (and expert tensors) outside the token embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed_tokens" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def save_checkpoint(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, report: TrainReport
) -> None:
    """A standard HF folder with bf16 weights (half the size; held-out loss equal to 4 decimals)."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(asdict(report)) + "\n", encoding="utf-8")


def train_demo(
    out_dir: Path,
    *,
    steps: int = 600,
    seed: int = 0,
    early_step: int | None = None,
    progress: bool = True,
    docs: list[dict] | None = None,
) -> TrainReport:
    """Train tokenizer and model; write ``out_dir/model`` and ``out_dir/checkpoints/early``.

    ``early_step`` defaults to 15 % of ``steps``. ``docs`` (records with ``domain`` and ``text``, every
    domain of DOMAINS longer than one window) defaults to the shipped training split. Uses one torch
    thread: the machines this runs on are small and shared, and more threads on 2 cores slow everything.
    """
    torch.set_num_threads(1)
    early_step = early_step if early_step is not None else round(EARLY_SHARE * steps)
    docs = docs if docs is not None else load_corpus("train")
    tokenizer = train_tokenizer(doc["text"] for doc in docs)
    streams = domain_streams(tokenizer, docs)
    model = new_model(seed)
    model.train()
    cfg = model.config
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    report = TrainReport(seed, steps, 0, 0, 0.0, [], [])
    start = time.perf_counter()
    bar = tqdm(total=steps * BATCH_SIZE * SEQ_LEN, unit="tok", unit_scale=True, disable=not progress)
    for step in range(1, steps + 1):
        batch = sample_batch(streams, gen)
        out = model(input_ids=batch, output_router_logits=True)
        lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        balance = per_layer_balance_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        optimizer.zero_grad(set_to_none=True)
        (lm + BALANCE_COEF * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        scheduler.step()
        report.step, report.tokens_seen = step, step * BATCH_SIZE * SEQ_LEN
        report.lm_loss.append(round(lm.item(), 4))
        report.balance_loss.append(round(balance.item(), 4))
        report.seconds = round(time.perf_counter() - start, 1)
        bar.update(BATCH_SIZE * SEQ_LEN)
        bar.set_postfix(step=step, loss=f"{lm.item():.3f}", balance=f"{balance.item():.3f}")
        if step == early_step:
            save_checkpoint(model, tokenizer, out_dir / "checkpoints" / "early", report)
    bar.close()
    save_checkpoint(model, tokenizer, out_dir / "model", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the moelens demo model (CPU, one thread).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="default: the package")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--early-step", type=int)
    args = parser.parse_args(argv)
    report = train_demo(args.out, steps=args.steps, seed=args.seed, early_step=args.early_step)
    tail = report.lm_loss[-20:]
    print(
        f"{report.steps} steps, {report.tokens_seen:,} tokens in {report.seconds:.0f} s; "
        f"train loss (last 20 steps) {sum(tail) / len(tail):.3f}"
    )


if __name__ == "__main__":
    main()
