"""Prefix sharing (prefix_sharing: true) against separate sequences: one DPO micro-batch's forward + backward of the
policy (models.batch_logps), padded and packed (SDPA), and packed with varlen_attn (what a packed CPU run gets by
default), for prompts of several lengths and short replies.

    python bench/prefix.py [--threads 1] [--repeats 5] [--out FILE.json]

The model is example/tiny-dpo.yml's shape widened to a 4-layer Llama (hidden 256, the 2k example tokenizer), float32
on the CPU; each case is 8 pairs of random token prompts of P tokens and replies of 16-24 tokens, the same tokens
with and without sharing. Reported per case: milliseconds per micro-batch (median of --repeats after one warm-up),
tokens computed, and the ratio shared / separate (< 1: sharing is faster).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
PROMPTS = (16, 64, 256, 768)


def pairs(prompt_len, n=8, seed=0, vocab=2000):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        sides = {}
        for side in ("chosen", "rejected"):
            reply = [rng.randrange(10, vocab) for _ in range(rng.randint(16, 24))]
            sides[f"{side}_input_ids"] = prompt + reply
            sides[f"{side}_labels"] = [-100] * prompt_len + reply
        out.append({"prompt_input_ids": prompt, **sides})
    return out


def time_case(model, examples, packing, sharing, repeats):
    import data
    import models
    batch = data.collate(examples, 0, packing=packing, max_length=4096, prefix_sharing=sharing)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        models.batch_logps(model, batch, batch["n_seqs"]).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), int((batch["seq_ids"] >= 0).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import attention
    torch.set_num_threads(args.threads)
    attention.register_varlen_attention(torch.device("cpu"), "float32", prefix_sharing=True)
    config = AutoConfig.for_model(vocab_size=2048, **MODEL)
    models = {}
    for attn in ("sdpa", attention.VARLEN_ATTN):
        torch.manual_seed(0)
        models[attn] = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    rows = []
    for prompt_len in PROMPTS:
        examples = pairs(prompt_len)
        for packing, attn in ((False, "sdpa"), (True, "sdpa"), (True, attention.VARLEN_ATTN)):
            separate = time_case(models[attn], examples, packing, False, args.repeats)
            shared = time_case(models[attn], examples, packing, True, args.repeats)
            rows.append({"prompt": prompt_len, "packing": packing, "attention": attn, "separate_ms": separate[0],
                         "shared_ms": shared[0], "separate_tokens": separate[1], "shared_tokens": shared[1],
                         "ratio": shared[0] / separate[0]})
    print("| prompt tokens | packing | attention | separate (ms) | shared (ms) | tokens separate / shared | "
          "shared / separate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['packing']} | {r['attention']} | {r['separate_ms']:.0f} | {r['shared_ms']:.0f} | "
              f"{r['separate_tokens']} / {r['shared_tokens']} | {r['ratio']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "threads": args.threads, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
