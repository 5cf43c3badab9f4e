"""GPU benchmark: SFT and DPO tokens/s and MFU in bfloat16 for a 1.1B Llama-shaped model built from a config.

    python bench/gpu.py [--out DIR] [--steps 30] [--budget 300]

One prepared script for a lent GPU (see bench/README.md). It first checks, on the GPU, that packed and padded batches
give the same per-sequence log-probs (float32 and bfloat16 autocast), then runs train.py as child processes on the
synthetic long-tailed workload of bench/workload.py: SFT and DPO packed, with SDPA (transformers' block-diagonal
mask) and with attn_implementation=varlen_attn (PyTorch's FlashAttention varlen kernel), DPO also with precomputed
reference log-probs, then, time permitting, SFT with compile=true and both without packing. Throughput is read from each run's metrics.jsonl
(non-padding tokens/s and MFU per logging window; the first window, with CUDA warm-up, is dropped; medians of the
rest). Model: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

MODEL = ("{model_type: llama, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32, "
         "num_key_value_heads: 4, max_position_embeddings: 2048, vocab_size: 32000}")
COMMON = ["device=cuda", f"model.from_config={MODEL}", "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16",
          "max_length=1024", "max_prompt_length=512", "total_batch_size=64", "print_log_step=5", "debug=true",
          "report_to_tensorboard=false", "lr=1e-5", "warmup_steps=2", "optimizer_kwargs={fused: true}", "overwrite=true"]
VARLEN = "model.attn_implementation=varlen_attn"
# (name, task, overrides, optional): micro-batches sized to what fits: packed rows hold many examples, padded rows one
# each. Optional runs are skipped once the --budget is spent, so the ones that matter most come first.
RUNS = [
    ("sft packed", "sft", ["packing=true", "gradient_accumulation_steps=1"], False),
    ("sft packed varlen", "sft", ["packing=true", "gradient_accumulation_steps=1", VARLEN], False),
    ("dpo packed", "dpo", ["packing=true", "gradient_accumulation_steps=2"], False),
    ("dpo packed varlen", "dpo", ["packing=true", "gradient_accumulation_steps=2", VARLEN], False),
    ("dpo packed varlen + precomputed reference", "dpo", ["packing=true", "gradient_accumulation_steps=2", VARLEN,
                                                          "precompute_reference_logps=true"], False),
    ("sft packed varlen + compile", "sft", ["packing=true", "gradient_accumulation_steps=1", VARLEN, "compile=true"], True),
    ("sft padded", "sft", ["packing=false", "gradient_accumulation_steps=4"], True),
    ("dpo padded", "dpo", ["packing=false", "gradient_accumulation_steps=8"], True),
]


def check_packing_on_gpu(device="cuda"):
    """Per-sequence log-probs on the GPU's attention kernels: packed (SDPA with transformers' block mask, and
    varlen_attn) against padded SDPA; returns the max differences."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import attention
    import data
    import models
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    attention.register_varlen_attention(torch.device(device))
    varlen = AutoModelForCausalLM.from_config(config, attn_implementation="varlen_attn").to(device).eval()
    varlen.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in torch.randint(20, 300, (16,), generator=g).tolist():
        ids = torch.randint(0, 32000, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        examples.append({"input_ids": ids, "labels": labels, "prompt_input_ids": ids[:n // 3]})
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            got = {}
            for name, m, packing in (("padded", model, False), ("packed", model, True), ("varlen", varlen, True)):
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in data.collate(examples, 0, packing=packing, max_length=1024).items()}
                got[name] = models.batch_logps(m, batch, len(examples))
            out[f"{dtype} packed"] = (got["packed"] - got["padded"]).abs().max().item()
            out[f"{dtype} varlen"] = (got["varlen"] - got["padded"]).abs().max().item()
            out[f"{dtype} scale"] = got["padded"].abs().max().item()
    return out


def run(name, task, overrides, configs, out, steps):
    log = os.path.join(out, name.replace(" ", "_").replace("+", "") + ".log")
    run_dir = os.path.join(out, "runs", name.replace(" ", "_").replace("+", ""))
    args = [sys.executable, os.path.join(ROOT, "train.py"), configs[task], "--overrides", *COMMON, *overrides,
            f"n_examples={steps * 64}", "n_epochs=null", f"output_dirs={run_dir}"]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = open(log).read()[-2000:]
        return {"name": name, "error": f"exit {proc.returncode}", "tail": tail, "wall_s": wall}
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"tokens_per_second"' in line]
    steady = rows[1:] or rows
    return {"name": name, "wall_s": wall, "windows": len(rows),
            "tokens_per_s": statistics.median(r["tokens_per_second"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-gpu"))
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of 64 examples per run")
    ap.add_argument("--budget", type=float, default=300, help="seconds after which optional runs are skipped")
    ap.add_argument("--smoke", action="store_true", help="a dry run of this script on the CPU with a tiny model")
    args = ap.parse_args()
    if args.smoke:  # same code path, CPU-sized
        small = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4}"
        COMMON[:2] = ["device=cpu", f"model.from_config={small}"]
        RUNS[:] = [r for r in RUNS if not r[0].endswith("compile")]
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()
    import torch
    import workload
    device = "cpu" if args.smoke else "cuda"
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    results = {"packing_check": check_packing_on_gpu(device)}
    print("packed vs padded log-probs on GPU, max |diff|:", results["packing_check"], flush=True)
    configs = workload.write(os.path.join(args.out, "workload"), n_sft=args.steps * 64, n_dpo=args.steps * 64)
    results["runs"] = []
    for name, task, overrides, optional in RUNS:
        if optional and time.perf_counter() - began > args.budget:
            print(f"skipped {name}: over the {args.budget:.0f} s budget", flush=True)
            continue
        result = run(name, task, overrides, configs, args.out, args.steps)
        results["runs"].append(result)
        print(json.dumps(result)[:600], flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| run | non-pad tokens/s | MFU | first loss | last loss | wall s |\n|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | | | | {r['wall_s']:.0f} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
              f"{r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
