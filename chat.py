"""Try a checkpoint: chat with it in the terminal, or generate completions for a file of prompts.

    python chat.py outputs/tiny-sft                 # a run folder: its final/ (or newest checkpoint); or a model folder
    python chat.py outputs/tiny-grpo --prompts example/data/prompts_demo.json --out completions.jsonl \\
        --num_generations 4 --rewards example/rewards.py:write_what_is_asked

In the chat, the conversation is rendered with the tokenizer's chat template and the reply streams as it is
generated; /reset clears the history, /system TEXT sets a system prompt (and clears the history), /exit quits.
With --prompts every prompt of a prompt, SFT or preference file (as data.py reads it) gets --num_generations
completions, batched; one JSON line per completion, with the rewards of --rewards (the `rewards:` functions of
training: math, format, overlong or file.py:function; or a reward model's folder) when given.
"""
import argparse
import json
import os
import sys

from utils import UserError

HELP = "/reset clears the history, /system TEXT sets a system prompt, /exit quits"


def find_model(path) -> tuple:
    """(the base: a folder with the weights, or the config.yaml of a LoRA checkpoint; adapter folder or None) of what
    the user named: a model folder, a LoRA adapter folder (on the base its adapter_config.json names), a LoRA run's
    step checkpoint (its adapter/ on the base its config.yaml builds), or a run folder (its final/, else its newest
    checkpoint)."""
    import checkpoints
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        with open(os.path.join(path, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}: a LoRA adapter whose adapter_config.json names no base model")
        return base, path
    found = checkpoints.list_checkpoints(path)
    final = os.path.join(path, "final")
    for folder in [path] + ([final] if os.path.isfile(os.path.join(final, "trainer_state.json")) else []) + \
            [p for _, p in reversed(found)]:
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, None
        if os.path.isdir(os.path.join(folder, "adapter")):  # a LoRA run's step checkpoint: the adapter only
            run_config = os.path.join(folder, "config.yaml")
            if os.path.isfile(run_config):
                return run_config, os.path.join(folder, "adapter")
            return find_model(os.path.join(folder, "adapter"))
    raise UserError(f"{path}: holds no model (no config.json, adapter_config.json or checkpoint with weights)")


def run_base(run_config, tokenizer):
    """The base a LoRA checkpoint's adapter was trained on, built from the checkpoint's config.yaml as training
    builds it (models.load_policy: model.name_or_path, model.archive, or model.from_config under the run's seed),
    float32, with the plain attention kernel."""
    from omegaconf import OmegaConf

    import config
    import models
    from utils import set_seed
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(config.Config), OmegaConf.load(run_config))
    except Exception as e:  # not a config of this project
        raise UserError(f"{run_config}: not a run's config ({' '.join(str(e).split())[:200]})") from e
    cfg.model.attn_implementation, cfg.packing, cfg.activation_checkpointing = None, False, False  # generation: the default
    set_seed(cfg.seed)  # model.from_config: the same random base as the run drew
    return models.load_policy(cfg, tokenizer)


def load(path, device):
    """(model in eval mode on `device`, tokenizer prepared as training prepares it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data
    import models
    base, adapter = find_model(path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    run_config = base if base.endswith("config.yaml") else None  # a LoRA checkpoint: its own tokenizer
    has_tokenizer = adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    source = adapter if has_tokenizer else os.path.dirname(run_config) if run_config else base
    tokenizer = data.prepare_tokenizer(models.from_pretrained(AutoTokenizer, source, "tokenizer"))
    if run_config:
        model = run_base(run_config, tokenizer)
    else:
        model = models.from_pretrained(AutoModelForCausalLM, base, "model", dtype=dtype)
    if adapter is not None:
        import peft

        from adapters import quiet_peft
        with quiet_peft():
            model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device, dtype).eval(), tokenizer


def sampling(args, tokenizer) -> dict:
    # exactly softmax(logits / temperature) within top_p, as training samples: the model's own generation_config
    # knobs (top_k, repetition penalty) off
    how = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, repetition_penalty=1.0) \
        if args.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **how)


def chat(model, tokenizer, args, read=input):
    """The interactive loop: one user turn at a time, the reply streamed to stdout."""
    import torch
    from transformers import TextStreamer
    history, system = [], None
    print(f"chatting with {args.model} ({HELP})", flush=True)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line in ("/reset", "/system") or line.startswith("/system "):
            if line != "/reset":  # a new system prompt starts a new conversation
                system = line[len("/system"):].strip() or None
            history = []
            print("(history cleared)" + (f" system: {system}" if system else ""), flush=True)
            continue
        if line.startswith("/") or not line:
            print(f"({HELP})" if line else "", flush=True)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"].to(model.device)
        print("model> ", end="", flush=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **sampling(args, tokenizer),
                                 streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        print(flush=True)


def generate_file(model, tokenizer, records, args) -> int:
    """Completions of every prompt record (of --prompts) into --out (JSON lines), scored by --rewards."""
    import torch

    import data
    import rewards as reward_fns
    import rollouts
    prompts = [data.tokenize_example(r, tokenizer, "prompt", args.max_prompt_length, args.max_prompt_length)[0]
               for r in records]
    k = args.num_generations
    with torch.no_grad():
        completions, truncated = rollouts.generate(
            model, [p["prompt_input_ids"] for p in prompts], num_generations=k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, seed=args.seed, micro_batch=args.batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    shown = [reward_fns.prompt_for_rewards(r) for r in records for _ in range(k)]
    values = {}
    if args.rewards:
        entries = [{"model": f} if os.path.isdir(f) else {"function": f} for f in args.rewards]  # folder: reward model
        functions = reward_fns.load_rewards(entries, device=args.device)
        total, values = reward_fns.score_records(functions, records, texts, completions, k)
        values = {"reward": total, **{f"rewards/{n}": v for n, v in values.items()}}
    with open(args.out, "w") as f:
        for i, (prompt, text, cut) in enumerate(zip(shown, texts, truncated)):
            row = {"index": i // k, "sample": i % k, "prompt": prompt, "completion": text, "truncated": cut,
                   **{name: (None if v[i] != v[i] else float(v[i])) for name, v in values.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} completions of {len(records)} prompts to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a checkpoint, or generate for a file of prompts.")
    parser.add_argument("model", help="a run folder (its final/ or newest checkpoint), a model or a LoRA adapter folder")
    parser.add_argument("--prompts", help="generate for every prompt of this file instead of chatting")
    parser.add_argument("--out", default="completions.jsonl", help="--prompts: the JSON-lines file to write")
    parser.add_argument("--num_generations", type=int, default=1, help="--prompts: completions per prompt")
    parser.add_argument("--rewards", nargs="*", default=[],
                        help="--prompts: reward functions (or reward model folders) to score them with")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--max_prompt_length", type=int, default=1024, help="--prompts: keep a prompt's last N tokens")
    parser.add_argument("--batch_size", type=int, default=32, help="--prompts: sequences per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    args = parser.parse_args(argv)
    try:
        import torch
        from transformers.utils import logging as hf_logging

        import formats
        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a terminal chat
        records = formats.load_examples({"type": "custom_dataset", "path": args.prompts}, "prompt") \
            if args.prompts else None  # a bad prompt file is said before any model loads
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # a reward model's too
        model, tokenizer = load(args.model, args.device)
        return generate_file(model, tokenizer, records, args) if args.prompts else chat(model, tokenizer, args) or 0
    except Exception as e:  # the project's one-line errors: bad input is exit 2
        from formats import DataError
        if not isinstance(e, (UserError, DataError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
