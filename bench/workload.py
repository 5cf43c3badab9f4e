"""Deterministic synthetic workload for the benchmark: SFT conversations, DPO pairs and a train.py config for each.

    python bench/workload.py --out DIR [--n-sft N] [--n-dpo N] [--seed S] [--check]

Writes DIR/sft.json (seed "messages" format, 1-3 turns), DIR/dpo.json (seed "conversations/chosen/rejected"
format), DIR/sft.yml and DIR/dpo.yml. Lengths are long-tailed on purpose (log-normal word counts): in right-padded
micro-batches about half of all positions are then padding, which is what packing is meant to save. The text is
plain lowercase English words that the 2k BPE tokenizer in example/tokenizer encodes in one or two tokens each, so
token counts stay predictable. The same arguments always give byte-identical files (stdlib `random.Random(seed)`).
--check tokenizes the result with the project's own data pipeline and prints the length and padding statistics.
"""
import argparse
import json
import math
import os
import random
import sys
from config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "example", "tokenizer")

# Common English words that example/tokenizer encodes as 1-2 tokens (" word"), about 1.6 tokens per word on average.
WORDS = """
the and of to in is it you that was for on are with as be at one have this from or had by not word but what some
we can out other all there up use your how an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did no most my over know than
call who may now find any new work part get made live where after back little only man came show every good me
our under name very form great think say help low line turn much mean move old too same tell does set three want
air well also small end put home read hand port large spell add even land here big high such follow act why ask
men went kind off need us again world near self father head stand page should answer still food sun four state
never last let tree start story far sea left late run real open next got walk example often letter mile river car
feet care book took eat friend fish mountain stop once hear cut sure color face wood main young ever red list talk
soon dog leave song door black short wind question complete area rock order problem told top whole king space
hour better true step early reach fast sing listen six less ten war lay against slow appear map rain unit fine fly
fall lead note plan figure star noun rest correct done stood contain teach gave green free strong mind clear fact
inch nothing course stay force blue deep moon foot system busy test ran check game hot heat snow yes fill east among
""".split()
# Zipf-like word frequencies (rank^-0.9): frequent short words, a long tail of rarer ones, as in real text.
WEIGHTS = [1.0 / (rank + 1) ** 0.9 for rank in range(len(WORDS))]
# Rejected DPO responses draw words with the ranking reversed: a preference the policy can actually learn, so the DPO
# loss falls during the run (as in real training) instead of hovering at log 2 on pure noise.
REJECTED_WEIGHTS = WEIGHTS[::-1]

# Median word count and log-normal sigma of each kind of message. sigma ~0.9 gives the long tail: most examples are
# short, a few are 5-10x longer (and some of those reach max_length), so a batch's longest row is ~2x its mean.
USER, ASSISTANT = (14, 0.9), (34, 0.95)
PROMPT, RESPONSE = (16, 0.9), (36, 0.95)
# Default size: one `train.py packing=false` run of each task takes roughly 30-60 s with OMP_NUM_THREADS=1 on the
# 2-vCPU development machine (float32, see native_bf16).
N_SFT, N_DPO = 80, 48


def words(rng, median, sigma, weights=WEIGHTS):
    """A run of words whose count is log-normal, with a full stop every 6-18 words (sentences)."""
    n = max(1, min(600, round(rng.lognormvariate(math.log(median), sigma))))
    out, until_stop = [], rng.randint(6, 18)
    for w in rng.choices(WORDS, weights=weights, k=n):
        until_stop -= 1
        out.append(w + "." if until_stop == 0 else w)
        if until_stop == 0:
            until_stop = rng.randint(6, 18)
    return " ".join(out)


def sft_record(rng):
    turns = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, *USER)})
        messages.append({"role": "assistant", "content": words(rng, *ASSISTANT)})
    return {"messages": messages}


def dpo_record(rng):
    # a one- or two-round context (human, gpt, human), then two independently long responses
    context = [{"from": "human", "value": words(rng, *PROMPT)}]
    if rng.random() < 0.3:
        context += [{"from": "gpt", "value": words(rng, *RESPONSE)}, {"from": "human", "value": words(rng, *PROMPT)}]
    return {"conversations": context, "chosen": {"from": "gpt", "value": words(rng, *RESPONSE)},
            "rejected": {"from": "gpt", "value": words(rng, *RESPONSE, REJECTED_WEIGHTS)}}


def native_bf16() -> bool:
    """True when this CPU has bfloat16 matrix instructions (avx512_bf16 / amx_bf16). Without them torch's CPU bf16
    matmuls take a slow path: on an AVX2-only EPYC (Zen 3) a bf16-autocast step of the benchmark model measured
    ~20x SLOWER than float32, so bf16 there would benchmark that fallback rather than the trainer."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_dtype(dtype):
    return ("bfloat16" if native_bf16() else "float32") if dtype == "auto" else dtype


def config_yaml(task, out, dtype="bfloat16"):
    """The train.py config of one task: a ~20M-parameter Llama-shaped model with a 32k vocabulary (so the lm_head and
    the log-softmax over the vocabulary cost what they cost in real models), one CPU device, `dtype` autocast."""
    loss = "  name: sft" if task == "sft" else "  name: dpo\n  beta: 0.1"
    return f"""# Benchmark workload ({task}), written by bench/workload.py. Run: python train.py {task}.yml
seed: 0
exp_name: bench-{task}
datasets:
  - type: custom_dataset
    path: {os.path.join(out, task + '.json')}
trainer: BasicTrainer
device: cpu
optimizer: AdamW
lr: 1.0e-4
weight_decay: 0.0
lr_scheduler: constant
warmup_steps: 2
total_batch_size: 16
gradient_accumulation_steps: 2
max_grad_norm: 10.0
max_length: 512
max_prompt_length: 256
n_epochs: 1
n_eval_examples: 0
do_first_eval: false
print_log_step: 5
save_optimizer: false
output_dirs: {os.path.join(out, 'runs', task)}
report_to_tensorboard: true
wandb:
  enabled: false
model:
  name_or_path: null
  tokenizer_name_or_path: {TOKENIZER}
  from_config:
    model_type: llama
    hidden_size: 256
    intermediate_size: 688
    num_hidden_layers: 4
    num_attention_heads: 4
    num_key_value_heads: 4
    max_position_embeddings: 1024
    vocab_size: 32000
  policy_dtype: {dtype}
  reference_dtype: {dtype}
loss:
{loss}
"""


def write(out, n_sft=N_SFT, n_dpo=N_DPO, seed=0, dtype="auto"):
    """Write the four files into `out` (created if needed); returns {task: config path}. dtype: bfloat16 | float32 |
    auto (bfloat16 where the CPU has native bf16 instructions, else float32)."""
    dtype = pick_dtype(dtype)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    records = {"sft": [sft_record(rng) for _ in range(n_sft)], "dpo": [dpo_record(rng) for _ in range(n_dpo)]}
    configs = {}
    for task, recs in records.items():
        with open(os.path.join(out, task + ".json"), "w", encoding="utf-8") as f:
            json.dump(recs, f, indent=1)
        configs[task] = os.path.join(out, task + ".yml")
        with open(configs[task], "w", encoding="utf-8") as f:
            f.write(config_yaml(task, out, dtype))
    return configs


def token_stats(config_path):
    """Tokenize a workload exactly as train.py does; -> dict of counts, including the padding share of right-padded
    micro-batches in train.py's example order (seeded permutation per epoch, global batch, micro-batches)."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoTokenizer
    import data
    import utils
    cfg = load_config(config_path)
    tok = data.prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path))
    kind = "sft" if cfg.loss.name == "sft" else "preference"
    train, _, stats = data.build_datasets([dict(s) for s in cfg.datasets], [dict(s) for s in cfg.eval_datasets], tok,
                                          kind, cfg.max_length, cfg.max_prompt_length, cfg.n_eval_examples, cfg.seed)
    keys = ("input_ids",) if kind == "sft" else ("chosen_input_ids", "rejected_input_ids")
    nonpad = padded = 0
    micro = math.ceil(cfg.total_batch_size / cfg.gradient_accumulation_steps)
    for epoch in range(cfg.n_epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for start in range(0, len(order), micro):  # global batches are whole multiples of micro-batches here
            rows = [train[i][k] for i in order[start:start + micro] for k in keys]
            nonpad += sum(len(r) for r in rows)
            padded += len(rows) * max(len(r) for r in rows)
    lengths = sorted(len(ex[k]) for ex in train for k in keys)
    return {"examples": len(train), "truncated": stats["truncated"], "skipped": stats["skipped"],
            "nonpad_tokens": nonpad, "padded_positions": padded, "padding_share": 1 - nonpad / padded,
            "p50": lengths[len(lengths) // 2], "p90": lengths[int(len(lengths) * 0.9)], "max": lengths[-1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write sft.json, dpo.json, sft.yml, dpo.yml into")
    ap.add_argument("--n-sft", type=int, default=N_SFT, help=f"SFT conversations (default {N_SFT})")
    ap.add_argument("--n-dpo", type=int, default=N_DPO, help=f"DPO preference pairs (default {N_DPO})")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="policy/reference dtype in the configs; auto: bfloat16 only where the CPU has native bf16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the text generator (the configs keep seed 0)")
    ap.add_argument("--check", action="store_true", help="tokenize and print length / padding statistics")
    args = ap.parse_args(argv)
    configs = write(args.out, args.n_sft, args.n_dpo, args.seed)
    print(f"wrote {args.n_sft} SFT records, {args.n_dpo} DPO pairs and {', '.join(configs.values())} "
          f"(dtype {pick_dtype(args.dtype)})")
    if args.check:
        for task, path in configs.items():
            print(task, json.dumps(token_stats(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
