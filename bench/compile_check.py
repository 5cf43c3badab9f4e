"""compile=true against eager: one packed SGD step (lr 1, 8 examples) of the tiny SFT and DPO examples.

    OMP_NUM_THREADS=1 python bench/compile_check.py [OVERRIDE ...]    # e.g. model.attn_implementation=varlen_attn

Prints each task's loss both ways, the largest difference in the parameter update relative to the largest update,
and how long the first (compiling) step took. Not in the test suite: compiling takes about a minute on a CPU.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from config import load_config


def one_step(kind, compile_):
    cfg = load_config(os.path.join(ROOT, "example", f"tiny-{kind}.yml"), [
        "n_eval_examples=0", "optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0", "total_batch_size=8",
        "packing=true", f"compile={str(compile_).lower()}", *sys.argv[1:]])
    trainer = train.build_trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    start = time.perf_counter()
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    update = {k: v.detach() - before[k] for k, v in trainer.policy.state_dict().items()}
    return metrics["loss"], update, time.perf_counter() - start


def main():
    for kind in ("sft", "dpo"):
        eager_loss, eager, eager_s = one_step(kind, False)
        compiled_loss, compiled, compiled_s = one_step(kind, True)
        largest = max(v.abs().max().item() for v in eager.values())
        diff = max((compiled[k] - eager[k]).abs().max().item() for k in eager)
        print(f"{kind}: loss eager {eager_loss:.6f} compiled {compiled_loss:.6f}; max update difference "
              f"{diff / largest:.1e} of the largest update; first step eager {eager_s:.1f} s, compiled {compiled_s:.1f} s")


if __name__ == "__main__":
    main()
