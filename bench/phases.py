"""Where one train.py run's wall time goes, phase by phase, timed from inside (time.perf_counter, no profiler).

    python bench/phases.py CONFIG.yml [--overrides k=v ...] [--tree DIR] [--out FILE.json] [--profile FILE.prof]

Runs train.py's own entry (check_config_first, then cli) in this process with timing wrappers around the functions
that make up its phases; each phase's time is its own, without the wrapped phases inside it (so the phases add up to
the whole). What is left is "other". Process start-up before this script's first line (the interpreter) is read
from /proc/self/stat. Prints, and with --out writes, {"phases": {name: seconds}, "calls": {name: n}, "total_s"}.
--tree DIR: the project copy to import (default: this checkout). --profile: also a cProfile of the whole run.
Set OMP_NUM_THREADS=1 (bench/run.py's CHILD_ENV) for numbers comparable with the benchmark.
"""
import functools
import json
import os
import sys
import time

T0 = time.perf_counter()
# (module, attribute, phase). Classes: "Class.method". Patched where the callers look them up (a module that did
# `from x import f` holds its own reference: both are listed).
WRAPPED = [
    ("config", "load_config", "config"), ("train", "load_config", "config"),
    ("models", "build_tokenizer", "tokenizer load"),
    ("formats", "load_records", "data: read records"), ("data", "load_records", "data: read records"),
    ("data", "tokenize_example", "data: chat template + tokenize"),
    ("models", "build_models", "model build"),
    ("trainers", "Trainer.__init__", "trainer init (optimizer, ...)"),
    ("train", "prepare_run_dir", "run folder"),
    ("trainers", "MetricsWriter", "metrics writer (TensorBoard)"),
    ("data", "collate", "step: collate"),
    ("models", "token_logps", "step: forward"),
    ("losses", "micro_batch_loss", "step: loss"),
    ("trainers", "model_flops", "step: FLOP count"),
    ("objectives", "OfflineObjective.normalizer", "step: normaliser"),
    ("torch", "Tensor.backward", "step: backward"),
    ("trainers", "Trainer.update", "step: clip + optimizer"),
    ("metrics", "MetricsWriter.log", "step: metrics log"),
    ("checkpoints", "save", "final save"),
    ("trainers", "plot_curves", "plot"),
    ("metrics", "MetricsWriter.close", "metrics close"),
]


class Clock:
    """Exclusive time per phase: time in a wrapped call less the time of wrapped calls inside it."""

    def __init__(self):
        self.totals, self.calls, self.stack = {}, {}, []

    def wrap(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append(0.0)  # time of nested phases
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                nested = self.stack.pop()
                self.totals[phase] = self.totals.get(phase, 0.0) + spent - nested
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self.stack:
                    self.stack[-1] += spent
        timed.__wrapped_phase__ = True
        return timed


def install(clock):
    import importlib
    for module_name, attr, phase in WRAPPED:
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)
        if not getattr(fn, "__wrapped_phase__", False):
            setattr(owner, name, clock.wrap(fn, phase))


def process_age() -> float:
    """Seconds since this process started (/proc/self/stat field 22, in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main():
    argv = sys.argv[1:]

    def take(flag):  # this script's own options, out of train.py's arguments
        if flag not in argv:
            return None
        at = argv.index(flag)
        value = argv[at + 1]
        del argv[at:at + 2]
        return value
    tree, out, profile = take("--tree"), take("--out"), take("--profile")
    interpreter = process_age() - (time.perf_counter() - T0)
    root = os.path.abspath(tree or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    os.chdir(root)
    clock = Clock()
    start = time.perf_counter()
    import torch
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    import train  # the project's modules: imports
    imports = time.perf_counter() - start
    install(clock)
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    run_start = time.perf_counter()
    train.check_config_first(argv)
    code = train.cli(argv)
    run = time.perf_counter() - run_start
    if profile:
        profiler.disable()
        profiler.dump_stats(profile)
    phases = {"interpreter start-up": interpreter, "imports (torch, transformers, project)": imports, **clock.totals}
    phases["other"] = run - sum(clock.totals.values())
    report = {"phases": phases, "calls": clock.calls, "total_s": interpreter + imports + run, "exit": code}
    for name, seconds in phases.items():
        print(f"{name:40s} {seconds:8.2f} s  {clock.calls.get(name, '')}", file=sys.stderr)
    print(f"{'total':40s} {report['total_s']:8.2f} s", file=sys.stderr)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
