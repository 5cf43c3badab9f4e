"""Deterministic synthetic workload for the benchmark: SFT conversations, DPO pairs and a train.py config for each.

    python bench/workload.py --out DIR [--shape default|multiturn] [--n-sft N] [--n-dpo N] [--seed S] [--check]
                             [--vocab-size V] [--turn-weights 8,2] [--system-share 0.3]

Writes DIR/sft.json (seed "messages" format), DIR/dpo.json (seed "conversations/chosen/rejected" format), DIR/sft.yml
and DIR/dpo.yml (and DIR/tokenizer with --vocab-size). Lengths are long-tailed on purpose (log-normal word counts):
in right-padded micro-batches a large share of all positions is then padding, which is what packing is meant to
save. The text is plain lowercase English words that the 2k BPE tokenizer in example/tokenizer encodes in one or two
tokens each, so token counts stay predictable. The same arguments always give byte-identical files (stdlib
`random.Random(seed)`). --check tokenizes the result with the project's own data pipeline and prints the length and
padding statistics.

Shapes (SHAPES; each option above overrides its shape's value):
  default:   the original benchmark: a 19.6M-parameter Llama with a 32k vocabulary (example/tokenizer), 1-3
             user/assistant rounds, no system turn, 16 examples per step in 2 micro-batches.
  multiturn: issue 24's small-model, multi-turn workload: a 5.3M-parameter GPT-NeoX with a 4,096-token vocabulary
             (a byte-level BPE trained on the workload's own text as example/make_tokenizer.py trains one, into
             DIR/tokenizer), 512 conversations, 30% with a system turn, 20% with two user/assistant rounds (the
             rest one), right-padded batches of 8 (one micro-batch per step).
"""
import argparse
import json
import math
import os
import random
import sys

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
SYSTEM = (12, 0.5)
# Default size: one `train.py packing=false` run of each task takes roughly 30-60 s with OMP_NUM_THREADS=1 on the
# 2-vCPU development machine (float32, see native_bf16).
N_SFT, N_DPO = 80, 48

# The models (train.py's model.from_config; vocab_size: the shape's vocabulary).
MODELS = {
    # Llama-shaped, 19.6M parameters with a 32k vocabulary: the lm_head and the log-softmax over the vocabulary cost
    # what they cost in real models
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
    # GPT-NeoX (Pythia's family: untied embed_out, parallel residual, rotary on 25% of each head), 5.26M parameters
    # with a 4,096 vocabulary, of which 2.1M in the embedding and the head
    "neox": dict(model_type="gpt_neox", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=1024),
}
# What each --shape sets. turn_weights: relative frequency of 1, 2, ... user/assistant rounds in an SFT conversation;
# dpo_two_rounds: share of DPO contexts with two rounds (human, gpt, human) instead of one; system_share: share of
# conversations (SFT) and contexts (DPO) that open with a system turn; vocab_size None: example/tokenizer and a 32k
# model vocabulary; batch: (examples per optimizer step, micro-batches per step); lengths: (median words, sigma).
SHAPES = {
    "default": dict(model="llama", vocab_size=None, n_sft=N_SFT, n_dpo=N_DPO, turn_weights=(5, 3, 2),
                    dpo_two_rounds=0.3, system_share=0.0, batch=(16, 2), print_log_step=5,
                    lengths=dict(user=USER, assistant=ASSISTANT, prompt=PROMPT, response=RESPONSE, system=SYSTEM)),
    "multiturn": dict(model="neox", vocab_size=4096, n_sft=512, n_dpo=256, turn_weights=(8, 2),
                      dpo_two_rounds=0.2, system_share=0.3, batch=(8, 1), print_log_step=10,
                      # narrower than the default's: about 40% padding in batches of 8 (SFT 41%, DPO 39%)
                      lengths=dict(user=(14, 0.45), assistant=(34, 0.5), prompt=(16, 0.35), response=(36, 0.35),
                                   system=SYSTEM)),
}


def shape_of(name="default", **changes) -> dict:
    """SHAPES[name] with the given keys replaced (None leaves a key as it is)."""
    shape = dict(SHAPES[name])
    unknown = set(changes) - set(shape)
    if unknown:
        raise ValueError(f"unknown workload key(s): {', '.join(sorted(unknown))}")
    shape.update({k: v for k, v in changes.items() if v is not None})
    return shape


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


def system_turn(rng, shape):
    """[a system message] for shape["system_share"] of the conversations, else []; no random draw at share 0 (the
    default shape's files stay what they were)."""
    if shape["system_share"] and rng.random() < shape["system_share"]:
        return [{"role": "system", "content": words(rng, *shape["lengths"]["system"])}]
    return []


def sft_record(rng, shape=SHAPES["default"]):
    lengths, weights = shape["lengths"], shape["turn_weights"]
    messages = system_turn(rng, shape)
    turns = rng.choices(range(1, len(weights) + 1), weights=weights)[0]
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, *lengths["user"])})
        messages.append({"role": "assistant", "content": words(rng, *lengths["assistant"])})
    return {"messages": messages}


def dpo_record(rng, shape=SHAPES["default"]):
    # an optional system turn, a one- or two-round context (human, gpt, human), then two independently long responses
    prompt, response = shape["lengths"]["prompt"], shape["lengths"]["response"]
    context = [{"from": "system", "value": m["content"]} for m in system_turn(rng, shape)]
    context.append({"from": "human", "value": words(rng, *prompt)})
    if rng.random() < shape["dpo_two_rounds"]:
        context += [{"from": "gpt", "value": words(rng, *response)}, {"from": "human", "value": words(rng, *prompt)}]
    return {"conversations": context, "chosen": {"from": "gpt", "value": words(rng, *response)},
            "rejected": {"from": "gpt", "value": words(rng, *response, REJECTED_WEIGHTS)}}


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


def config_yaml(task, out, dtype="bfloat16", shape=SHAPES["default"], tokenizer=TOKENIZER):
    """The train.py config of one task: the shape's model from config (MODELS), one CPU device, `dtype` autocast."""
    loss = "  name: sft" if task == "sft" else "  name: dpo\n  beta: 0.1"
    arch = {**MODELS[shape["model"]], "vocab_size": shape["vocab_size"] or 32000}
    model = "".join(f"    {k}: {v}\n" for k, v in arch.items())
    total, micro_batches = shape["batch"]
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
total_batch_size: {total}
gradient_accumulation_steps: {micro_batches}
max_grad_norm: 10.0
max_length: 512
max_prompt_length: 256
n_epochs: 1
n_eval_examples: 0
do_first_eval: false
print_log_step: {shape["print_log_step"]}
save_optimizer: false
output_dirs: {os.path.join(out, 'runs', task)}
report_to_tensorboard: true
wandb:
  enabled: false
model:
  name_or_path: null
  tokenizer_name_or_path: {tokenizer}
  from_config:
{model}  policy_dtype: {dtype}
  reference_dtype: {dtype}
loss:
{loss}
"""


def train_tokenizer(records, vocab_size, folder):
    """A byte-level BPE tokenizer of (at most) vocab_size tokens trained on the records' text, as
    example/make_tokenizer.py trains the example one (special tokens, ChatML template with {% generation %}), saved
    to `folder`. The workload's few hundred distinct words run out of pairs to merge before 4,096 tokens: the
    tokenizer is then smaller, while the model's vocabulary (embedding and head) has vocab_size rows all the same."""
    sys.path.insert(0, os.path.join(ROOT, "example"))
    import make_tokenizer

    def texts():
        for r in records:
            turns = r["messages"] if "messages" in r else r["conversations"] + [r["chosen"], r["rejected"]]
            yield "\n".join(t.get("content", t.get("value")) for t in turns)
    make_tokenizer.wrap(make_tokenizer.train_texts(texts(), vocab_size)).save_pretrained(folder)
    return folder


def write(out, n_sft=None, n_dpo=None, seed=0, dtype="auto", shape="default", **changes):
    """Write the workload files into `out` (created if needed); returns {task: config path}. dtype: bfloat16 |
    float32 | auto (bfloat16 where the CPU has native bf16 instructions, else float32). shape: a SHAPES name;
    n_sft, n_dpo and `changes` (SHAPES keys) override its values."""
    dtype, shape = pick_dtype(dtype), shape_of(shape, n_sft=n_sft, n_dpo=n_dpo, **changes)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    records = {"sft": [sft_record(rng, shape) for _ in range(shape["n_sft"])],
               "dpo": [dpo_record(rng, shape) for _ in range(shape["n_dpo"])]}
    tokenizer = TOKENIZER
    if shape["vocab_size"]:
        tokenizer = train_tokenizer(records["sft"] + records["dpo"], shape["vocab_size"],
                                    os.path.join(out, "tokenizer"))
    configs = {}
    for task, recs in records.items():
        with open(os.path.join(out, task + ".json"), "w", encoding="utf-8") as f:
            json.dump(recs, f, indent=1)
        configs[task] = os.path.join(out, task + ".yml")
        with open(configs[task], "w", encoding="utf-8") as f:
            f.write(config_yaml(task, out, dtype, shape, tokenizer))
    return configs


def token_stats(config_path):
    """Tokenize a workload exactly as train.py does; -> dict of counts, including the padding share of right-padded
    micro-batches in train.py's example order (seeded permutation per epoch, global batch, micro-batches)."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoTokenizer
    import data
    from config import load_config
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


def add_shape_options(ap):
    """The workload's options (shared with bench/run.py); unset ones take the --shape's values."""
    ap.add_argument("--shape", choices=tuple(SHAPES), default="default", help="the workload's shape (default: default)")
    ap.add_argument("--n-sft", type=int, help=f"SFT conversations (default {N_SFT}; multiturn 512)")
    ap.add_argument("--n-dpo", type=int, help=f"DPO preference pairs (default {N_DPO}; multiturn 256)")
    ap.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size into the workload folder and "
                    "give the model this vocabulary (default: example/tokenizer, vocabulary 32000; multiturn 4096)")
    ap.add_argument("--turn-weights", type=lambda v: tuple(float(x) for x in v.split(",")),
                    help="relative frequencies of 1, 2, ... user/assistant rounds in SFT (default 5,3,2; "
                    "multiturn 8,2)")
    ap.add_argument("--system-share", type=float, help="share of conversations with a system turn (default 0; "
                    "multiturn 0.3)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="policy/reference dtype in the configs; auto: bfloat16 only where the CPU has native bf16")


def shape_args(args) -> dict:
    """write()'s keyword arguments from add_shape_options' options."""
    return dict(n_sft=args.n_sft, n_dpo=args.n_dpo, dtype=args.dtype, shape=args.shape, vocab_size=args.vocab_size,
                turn_weights=args.turn_weights, system_share=args.system_share)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write sft.json, dpo.json, sft.yml, dpo.yml into")
    add_shape_options(ap)
    ap.add_argument("--seed", type=int, default=0, help="seed of the text generator (the configs keep seed 0)")
    ap.add_argument("--check", action="store_true", help="tokenize and print length / padding statistics")
    args = ap.parse_args(argv)
    configs = write(args.out, seed=args.seed, **shape_args(args))
    shape = shape_of(args.shape, n_sft=args.n_sft, n_dpo=args.n_dpo)
    print(f"wrote {shape['n_sft']} SFT records, {shape['n_dpo']} DPO pairs and {', '.join(configs.values())} "
          f"(shape {args.shape}, dtype {pick_dtype(args.dtype)})")
    if args.check:
        for task, path in configs.items():
            print(task, json.dumps(token_stats(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
