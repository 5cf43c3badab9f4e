"""Where a packed bf16 SFT step of the 1.1B benchmark model spends its time on the GPU (torch.profiler), and the
step time with compile=true. Run after bench/gpu.py has written its workload:

    python bench/gpu_profile.py --workload DIR/workload [--steps 4] [--overrides model.attn_implementation=varlen_attn]
"""
import argparse
import os
import sys
import time
from config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def step_times(trainer, n):
    import torch
    batches = trainer.global_batches()
    times = []
    for _ in range(n):
        examples = next(batches)
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics, tokens, flops = trainer.train_step(examples)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start, tokens, flops))
    return times


def report(label, times, peak):
    seconds = sum(t for t, _, _ in times)
    tokens = sum(n for _, n, _ in times)
    flops = sum(f for _, _, f in times)
    print(f"{label}: {seconds / len(times) * 1000:.0f} ms/step, {tokens / seconds:,.0f} tokens/s, "
          f"MFU {flops / seconds / peak:.1%}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--overrides", nargs="*", default=[], help="extra config overrides, e.g. model.attn_implementation=varlen_attn")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import gpu
    import train
    for compile_ in (False, True):
        overrides = [*gpu.COMMON, "packing=true", "gradient_accumulation_steps=1", f"compile={str(compile_).lower()}",
                     "n_examples=640", "n_epochs=null", *args.overrides]
        cfg = load_config(os.path.join(args.workload, "sft.yml"), overrides)
        trainer = train.build_trainer(cfg)
        start = time.perf_counter()
        step_times(trainer, 2)  # warm-up (and compilation)
        print(f"compile={compile_}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
        report(f"compile={compile_}", step_times(trainer, args.steps), trainer.peak_flops)
        if not compile_:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                wall = time.perf_counter()
                step_times(trainer, 2)
                wall = time.perf_counter() - wall
            events = prof.key_averages()
            gpu_time = sum(e.self_device_time_total for e in events) / 1e6
            print(f"profiled 2 steps: wall {wall:.2f} s, GPU busy {gpu_time:.2f} s", flush=True)
            table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
            print(table, flush=True)
            with open(os.path.join(args.out, "profile.txt"), "w") as f:
                f.write(table)
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        del trainer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
