"""The benchmark's baseline: the plainest padded PyTorch loop doing the same maths as train.py on the same batches.

    python bench/bare_loop.py CONFIG.yml [--overrides key=value ...]

Same config loader, tokenization, initial weights, example order, micro-batches, losses, optimizer, schedule and
clipping as train.py's BasicTrainer; nothing else (no logging, no checks, no checkpoint state). Every micro-batch is
right-padded to its longest row. Prints per-step losses to stderr and, at the end, one JSON line on stdout:
{"nonpad_tokens": ..., "train_seconds": ..., "final_loss": ...}.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the project's own tokenization, so the token ids are exactly train.py's)
import utils  # noqa: E402
from config import load_config


def padded(rows, key, length, value):
    """[len(rows), length] long tensor of rows[i][key], right-padded with `value`."""
    return torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows], dtype=torch.long)


def sequence_logps(model, ids, mask, labels):
    """Summed log-prob of each row's label tokens: logits at t score the token at t + 1; -100 carries no loss."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)  # float32: bf16 log-probs would lose ~3 digits
    labels = labels[:, 1:]
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, picked, 0.0).sum(-1)


def main():
    ap = argparse.ArgumentParser(description="hand-written padded baseline of train.py")
    ap.add_argument("config")
    ap.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    sft = cfg.loss.name == "sft"
    assert cfg.loss.name in ("sft", "dpo") and not cfg.loss.reference_free and not cfg.loss.label_smoothing, \
        "the baseline implements plain SFT and plain DPO only"
    assert cfg.n_examples is None and cfg.lr_scheduler == "constant" and cfg.optimizer == "AdamW" and not \
        cfg.weight_decay, "the baseline does n_epochs, AdamW without weight decay and a constant lr only"

    # Same order of seeding and building as train.py, so the model starts from the very same random weights.
    utils.set_seed(cfg.seed)
    tok = data.prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path))
    train, _, _ = data.build_datasets([dict(s) for s in cfg.datasets], [dict(s) for s in cfg.eval_datasets], tok,
                                      "sft" if sft else "preference", cfg.max_length, cfg.max_prompt_length,
                                      cfg.n_eval_examples, cfg.seed)
    arch = dict(cfg.model.from_config)
    arch.setdefault("vocab_size", len(tok))
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    for name, value in list(vars(config).items()):  # dropout off, as train.py does: log-probs must be deterministic
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # float32 master weights
    model.train()
    # DPO's reference: a frozen copy of the initial model, stored and run in reference_dtype.
    ref_dtype = getattr(torch, cfg.model.reference_dtype or cfg.model.policy_dtype)
    reference = None if sft else copy.deepcopy(model).to(ref_dtype).eval().requires_grad_(False)
    dtype = getattr(torch, cfg.model.policy_dtype)  # autocast compute dtype (and the export dtype, as train.py)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

    # train.py's example order: one seeded permutation per epoch.
    order = [train[i] for epoch in range(cfg.n_epochs)
             for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()]
    steps, micro = math.ceil(len(order) / cfg.total_batch_size), math.ceil(cfg.total_batch_size / cfg.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)  # torch's default decay is 0.01
    warmup = cfg.warmup_steps  # linear warmup from lr/(warmup+1) to lr, then constant (trainers.build_scheduler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else 1.0)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf

    sides = ("",) if sft else ("chosen_", "rejected_")  # DPO: chosen rows, then rejected rows, one forward
    nonpad, step_loss, start = 0, float("nan"), time.perf_counter()
    for step in range(steps):
        examples = order[step * cfg.total_batch_size:(step + 1) * cfg.total_batch_size]
        # Normalise by the GLOBAL batch (label tokens for SFT, pairs for DPO): accumulation must not reweight.
        norm = sum(sum(t != -100 for t in ex["labels"][1:]) for ex in examples) if sft else len(examples)
        step_loss = 0.0
        for mb in (examples[i:i + micro] for i in range(0, len(examples), micro)):
            lengths = torch.tensor([len(ex[s + "input_ids"]) for s in sides for ex in mb])
            T = int(lengths.max())  # every row right-padded to this micro-batch's longest one
            ids = torch.cat([padded(mb, s + "input_ids", T, tok.pad_token_id) for s in sides])
            labels = torch.cat([padded(mb, s + "labels", T, -100) for s in sides])
            mask = (torch.arange(T) < lengths[:, None]).long()  # 1 on real tokens, 0 on padding
            nonpad += int(lengths.sum())
            with autocast():
                logps = sequence_logps(model, ids, mask, labels)
                if sft:
                    loss = -logps.sum() / norm
                else:
                    with torch.no_grad():
                        ref = sequence_logps(reference, ids, mask, labels)
                    n = len(mb)
                    h = (logps[:n] - logps[n:]) - (ref[:n] - ref[n:])
                    loss = -F.logsigmoid(cfg.loss.beta * h).sum() / norm
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}/{steps} loss {step_loss:.4f}", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - start

    # Export like train.py's final checkpoint: weights in policy_dtype, plus the tokenizer.
    out = os.path.join(os.path.abspath(os.path.expanduser(cfg.output_dirs)), "bare-loop-final")
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    print(json.dumps({"nonpad_tokens": nonpad, "train_seconds": round(train_seconds, 3), "final_loss": step_loss}))


if __name__ == "__main__":
    main()
