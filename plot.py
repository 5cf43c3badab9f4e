"""Runs compared: their curves in one PNG.

    python plot.py outputs/tiny-dpo outputs/tiny-simpo [--out runs.png]

Each run folder's metrics.jsonl gives its train and eval loss (and reward accuracy or mean reward, as the run's own
loss_curve.png shows them); each is labelled with its folder's name and the config keys whose values differ between
the runs (from each folder's config.yaml), e.g. "tiny-simpo (loss.name=simpo, loss.beta=2.0)".
"""
import argparse
import json
import os
import sys

from config import flat_keys
from utils import UserError


def load_run(folder):
    """(history rows, flat config or {}) of a run folder; one-line errors for a folder that is not a run."""
    from omegaconf import OmegaConf
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder")
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: holds no run (no metrics.jsonl): give the folder train.py wrote (output_dirs)")
    with open(path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    config = os.path.join(folder, "config.yaml")
    return history, flat_keys(OmegaConf.to_container(OmegaConf.load(config))) if os.path.isfile(config) else {}


def same_run_key(key) -> bool:
    """A key that does not change what a run trains: its name and folder, logging, evaluation and saving, the
    process layout, speed and memory options (checkpoints.MAY_CHANGE_ON_RESUME, what a resume may change)."""
    from checkpoints import MAY_CHANGE_ON_RESUME
    same = (*MAY_CHANGE_ON_RESUME, "exp_name", "output_dirs", "resume")
    return any(key == k or key.startswith(k + ".") for k in same)


def labels(folders, configs) -> list:
    """Each run's name and the config values that set it apart from the others."""
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if not same_run_key(k) and len({repr(c.get(k)) for c in configs}) > 1]
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    names = [n if names.count(n) == 1 else os.path.normpath(f) for n, f in zip(names, folders)]
    return [f"{name} ({', '.join(f'{k}={c.get(k)}' for k in differ)})" if differ else name
            for name, c in zip(names, configs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare runs: their curves in one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders (output_dirs of train.py)")
    parser.add_argument("--out", default="runs.png", help="the PNG to write (default: runs.png)")
    args = parser.parse_args(argv)
    try:
        loaded = [load_run(folder) for folder in args.runs]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from metrics import plot_runs
    names = labels(args.runs, [config for _, config in loaded])
    plot_runs({name: history for name, (history, _) in zip(names, loaded)}, args.out)
    print(f"wrote {args.out}: " + "; ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
