"""Entry point: config -> tokenizer, data, models -> trainer -> run folder.

    python train.py example/tiny-dpo.yml
    python train.py example/pythia28-dpo.yml --overrides lr=2e-5 batch_size=32
    python train.py example/pythia28-dpo.yml --overrides trainer=FSDPTrainer      # one worker per GPU (CPU: fsdp.world_size)
    torchrun --nproc_per_node 8 train.py example/pythia28-dpo.yml --overrides trainer=FSDPTrainer

Everything that can fail because of the user's input (config, data, model paths) is checked BEFORE anything is
written to the run folder, so a bad run never clobbers a good one. Such failures print one line and exit with code 2.
"""
import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile

from omegaconf import OmegaConf

from config import check_batch_split, config_yaml, load_config
from utils import SurvivingStream, TrainingError, UserError, abort_now, human_bytes, set_seed, write_atomic


def parse_args(argv=None) -> argparse.Namespace:
    """The command line. `--overrides` may come before or after the config file, and more than once."""
    parser = argparse.ArgumentParser(description="SFT / DPO training from one YAML config.")
    parser.add_argument("config", nargs="?", help="YAML config file, e.g. example/tiny-dpo.yml")
    parser.add_argument("--overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, dotted keys and YAML values: lr=2e-5 model.policy_dtype=bfloat16")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of input errors")
    args = parser.parse_args(argv)
    if args.config is None:  # `--overrides lr=1 my.yml`: the file went to --overrides (the one item without '=')
        files = [item for item in args.overrides if "=" not in item]
        if len(files) != 1:
            parser.error("give one config file, e.g. python train.py example/tiny-dpo.yml --overrides lr=2e-5")
        args.config = files[0]
        args.overrides.remove(files[0])
    return args


def run_dir_of(cfg) -> str:
    return os.path.abspath(os.path.expanduser(cfg.output_dirs))


def refuse_a_second_run(cfg):
    """A run folder holds one run: a new run (no resume) in a folder that holds one is refused, unless overwrite."""
    run_dir = run_dir_of(cfg)
    old_run = any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.yaml", "metrics.jsonl"))
    if cfg.resume is None and old_run and not cfg.overwrite and not cfg.eval_only:  # eval_only adds eval.json only
        raise UserError(f"config: output_dirs '{run_dir}' already holds a run: continue it with resume=auto, start "
                        "afresh with overwrite=true (removes its files), or pick another folder with "
                        "exp_name=NAME or output_dirs=PATH")


def check_config_first(argv=None):
    """`python train.py`: the config is checked before torch and transformers are imported, so that a mistake in it
    (or a run folder that holds a run already) is reported in well under a second; then the checks that need torch
    (seconds). cli loads it again."""
    args = parse_args(argv)
    try:
        refuse_a_second_run(load_config(args.config, args.overrides, light=True))
        load_config(args.config, args.overrides)
    except UserError as e:
        if args.traceback:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds it: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_config_first()

import torch  # noqa: E402 (after the config check above)
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
from formats import DataError  # noqa: E402
from layouts import LAYOUTS  # noqa: E402
from models import is_main_process  # noqa: E402
from trainers import Trainer  # noqa: E402


def build_data(cfg, tokenizer):
    specs = [dict(s) for s in cfg.datasets]
    eval_specs = [dict(s) for s in cfg.eval_datasets]
    train, evaluation, stats = data.build_datasets(specs, eval_specs, tokenizer, losses.data_kind(cfg.loss),
                                                   cfg.max_length, cfg.max_prompt_length, cfg.n_eval_examples, cfg.seed)
    notes = stats.pop("warnings", [])
    if is_main_process():
        for line in notes:
            print(line, file=sys.stderr)
        print("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return train, evaluation


def resolve_resume(cfg) -> list:
    """The checkpoints to continue from, the preferred first ([] to start afresh); refuses to mix a new run into an
    old run's folder. resume=auto lists the run's resumable checkpoints (eval_only: any complete one) newest first,
    leaving out (with a warning) any whose files were cut short or removed since they were written."""
    run_dir = run_dir_of(cfg)
    if cfg.resume is None:
        refuse_a_second_run(cfg)
        return []
    if cfg.resume == "auto":
        found = []
        for _, path in reversed(checkpoints.list_checkpoints(run_dir, resumable=not cfg.eval_only)):
            problem = checkpoints.checkpoint_problem(path)
            if problem and is_main_process():
                print(f"warning: checkpoint {path} is damaged ({problem}): skipped", file=sys.stderr)
            found += [] if problem else [path]
        return found
    if not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise UserError(f"config: resume: '{cfg.resume}' is not a complete checkpoint folder (no trainer_state.json); "
                        "use resume=auto or a step-N / final folder of a run")
    problem = checkpoints.checkpoint_problem(cfg.resume)
    if problem:
        raise UserError(f"resume: checkpoint {cfg.resume} is damaged ({problem}): resume from an earlier one")
    return [cfg.resume]


def check_resumed_config(cfg, candidates) -> tuple[list, bool]:
    """A resume continues the weights that the saved config describes (the checkpoint's own config.yaml, else the
    run folder's): a new value of a key that changes the maths (loss, model, data, batch, lr, lengths, seed, ...) is
    refused, unless resume_allow_changes=true; other changes (run length, logging, saving) are accepted. Returns the
    lines to print about what changed, and whether the maths changed (allowed)."""
    if not candidates:
        return [], False
    folder = candidates[0] if cfg.resume != "auto" else run_dir_of(cfg)
    path = next((p for p in (os.path.join(folder, "config.yaml"), os.path.join(os.path.dirname(folder), "config.yaml"))
                 if os.path.isfile(p)), None)
    if path is None:
        return [], False
    try:  # loaded as a config, so that it gets today's defaults and normalisation, as the new one did
        saved = load_config(path)
    except UserError:
        saved = OmegaConf.load(path)
    maths, other = checkpoints.config_changes(saved, cfg)
    if maths and not cfg.resume_allow_changes:
        raise UserError(f"resume: the run's weights were trained with another config ({'; '.join(maths)}; saved in "
                        f"{path}): start a new run (exp_name=NAME or output_dirs=PATH), or continue these weights "
                        "under the new values with resume_allow_changes=true")
    return [f"resume: {change} (accepted)" for change in other] + \
        [f"warning: resume: {change} (resume_allow_changes=true)" for change in maths], bool(maths)


def load_newest(trainer, candidates):
    """Load the first checkpoint of `candidates` that loads (eval_only: its weights only); with resume=auto an
    unreadable one (corrupt in a way its file sizes do not show) is skipped with a warning. Returns the path, or None
    for a fresh start."""
    load = checkpoints.load_weights_only if trainer.cfg.eval_only else checkpoints.load  # eval: no optimizer state
    for path in candidates:
        try:
            load(trainer, path)
            return path
        except (Exception, CheckpointException) as e:  # whatever torch.load / safetensors / DCP raise for damage
            e = checkpoints.first_failure(e) if isinstance(e, CheckpointException) else e
            detail = " ".join(str(e).split())[:200]  # torch's messages run over many lines
            if trainer.cfg.resume != "auto" or isinstance(e, UserError) and "does not match" in str(e):
                raise e if isinstance(e, UserError) else UserError(f"resume: cannot read {path}: {detail}") from e
            if trainer.is_main:
                print(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: {detail}): skipped",
                      file=sys.stderr)
    if candidates:
        raise UserError(f"resume: none of the {len(candidates)} checkpoints in {run_dir_of(trainer.cfg)} can be read; "
                        "start afresh with overwrite=true")
    return None


def take_run_lock(run_dir) -> int:
    """An exclusive lock on the run folder itself (flock on its descriptor: nothing is written), held until the
    process ends or the descriptor is closed: a second run on the same folder is refused instead of interleaving its
    files with ours. The kernel drops the lock of a dead process, so a crashed run never blocks the next one. The
    owner's pid is in `<run folder>/.lock` (written by prepare_run_dir), for the message."""
    import fcntl
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            with open(os.path.join(run_dir, ".lock")) as f:
                owner = f.read().strip() or "?"
        except OSError:
            owner = "?"
        raise UserError(f"config: output_dirs '{run_dir}' is in use by another run (pid {owner}); wait for it to end "
                        "or choose another output_dirs") from None
    return fd


def prepare_run_dir(cfg, n_params=0, fresh=True, lock=None, old_config_to=None):
    """Create the run folder and lock it, empty it first for overwrite=true, drop half-written checkpoints (and, with
    save_total_limit, the oldest step checkpoints beyond it), check it can hold a checkpoint, save the resolved config
    (the one it replaces renamed to `old_config_to` when given: a resume that changed the maths). Called only once
    every input has been checked; nothing is written into the folder before the space check has passed."""
    run_dir = run_dir_of(cfg)
    existing = run_dir
    while not os.path.exists(existing):  # the disk it will be on
        existing = os.path.dirname(existing)
    try:  # first: a read-only file system is not "too little space" (its free space is what it is)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"config: output_dirs: cannot write to '{run_dir}' ({e.strerror or e} at {existing}): choose "
                        "another output_dirs") from e
    export_bytes = models.DTYPES[cfg.model.policy_dtype].itemsize
    state_bytes = 12 if cfg.save_optimizer else 0  # Adam moments + float32 masters
    need, free = n_params * (export_bytes + state_bytes), shutil.disk_usage(existing).free
    if not cfg.debug and need > free:
        raise UserError(f"config: output_dirs: '{run_dir}' has {human_bytes(free)} free but one checkpoint needs about "
                        f"{human_bytes(need)}: free space or point output_dirs elsewhere")
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = take_run_lock(run_dir) if lock is None else lock
        write_atomic(os.path.join(run_dir, ".lock"), str(os.getpid()))
        if fresh and cfg.overwrite:
            for name in os.listdir(run_dir):
                if name != ".lock":
                    path = os.path.join(run_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        checkpoints.remove_partial_checkpoints(run_dir)
        if cfg.save_total_limit:  # also here: a run killed between a save and its pruning left one too many
            checkpoints.prune_checkpoints(run_dir, cfg.save_total_limit)
        if old_config_to and os.path.isfile(os.path.join(run_dir, "config.yaml")):
            os.replace(os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, old_config_to))
        write_atomic(os.path.join(run_dir, "config.yaml"), config_yaml(cfg))
    except OSError as e:
        raise UserError(f"config: output_dirs: cannot write to '{run_dir}': {e.strerror or e}") from e
    return run_dir, lock


def build_trainer(cfg):
    """Everything the run needs, checked and loaded; nothing is written yet."""
    models.check_versions()
    set_seed(cfg.seed)
    layout = LAYOUTS[cfg.trainer](cfg)  # the processes first: the models are built and placed for them
    tokenizer = models.build_tokenizer(cfg)
    train_data, eval_data = build_data(cfg, tokenizer)
    policy, reference, critic = models.build_models(cfg, tokenizer, layout)
    return Trainer(cfg, layout, policy, reference, tokenizer, train_data, eval_data, run_dir_of(cfg), critic=critic)


def print_header(trainer, n_params, resume_from, notes):
    """What is about to run: folder, start, devices, model size, steps (a short last batch said as such), the loss
    with its effective hyper-parameters (defaults filled in), the batches' layout and attention, then the config's
    notes."""
    cfg = trainer.cfg
    start = f"resuming from {resume_from} at step {trainer.step}" if resume_from else "starting"
    last = trainer.n_train_examples - (trainer.total_steps - 1) * cfg.total_batch_size
    steps = f"{trainer.total_steps} steps of {cfg.total_batch_size} examples" + \
        (f" (the last of {last})" if trainer.total_steps and last != cfg.total_batch_size else "")
    print(f"run folder: {trainer.run_dir} | {start} | device: {trainer.device} x {trainer.world_size} | policy: "
          f"{n_params / 1e6:.2f}M params | {steps}")
    hyper = " ".join(f"{k}={v}" for k, v in losses.hyperparameters(cfg.loss).items())
    print(f"loss: {cfg.loss.name}{' ' + hyper if hyper else ''}")
    layout = ["packed" if cfg.packing else "padded", f"attention {trainer.policy.config._attn_implementation}"]
    pairs = losses.LOSSES[cfg.loss.name].data in ("preference", "unpaired")  # KTO: its KL pairs; online pairs too
    if pairs and models.prefix_sharing(cfg, trainer.policy, trainer.device):
        layout.append("each pair's prompt once (prefix_sharing)")
    print("batches: " + ", ".join(layout))
    for line in notes:
        print(line, file=sys.stderr)


def main(config_path, overrides=()):
    """Returns the exit code: 0 finished, 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint."""
    notes = []
    cfg = load_config(config_path, overrides, notes)
    # an existing run folder is locked first: another run's checkpoints may otherwise change while we read them
    lock = take_run_lock(run_dir_of(cfg)) if is_main_process() and os.path.isdir(run_dir_of(cfg)) else None
    try:
        candidates = resolve_resume(cfg)
        resume_notes, maths_changed = check_resumed_config(cfg, candidates)
        trainer = build_trainer(cfg)
        resume_from = load_newest(trainer, candidates)
        if cfg.eval_only:
            return evaluate_only(trainer, resume_from)
        n_params = sum(p.numel() for p in trainer.policy.parameters())  # a sharded DTensor counts its full size
        failed = None
        if trainer.is_main:  # only now, once every input has been checked
            try:
                keep = f"config.before-step-{trainer.step}.yaml" if resume_from and maths_changed else None
                _, lock = prepare_run_dir(cfg, n_params, fresh=resume_from is None, lock=lock, old_config_to=keep)
            except UserError as e:
                failed = e
        if trainer.any_process(failed is not None):  # every rank stops, none waits for rank 0 in a collective
            raise failed or UserError("rank 0 could not prepare the run folder")
        if trainer.is_main:
            print_header(trainer, n_params, resume_from, notes + (resume_notes if resume_from else []))
        status = trainer.train()
    finally:
        if lock is not None:
            os.close(lock)
    if status == "interrupted" and trainer.is_main:
        again = " ".join(["python train.py", config_path, "--overrides", *overrides, "resume=auto"])
        print(f"stopped at step {trainer.step} with a checkpoint; continue with:\n  {again}", flush=True)
    trainer.any_process(False)  # a barrier: no worker exits (a launcher then stops the rest) before rank 0 has reported
    trainer.layout.close()
    return 128 + trainer.stop_signal if status == "interrupted" else 0


def evaluate_only(trainer, resume_from) -> int:
    """eval_only=true: the loss's evaluation, once, of the model as configured (or of the checkpoint resume= names),
    written to <run folder>/eval.json; nothing else in the folder is touched. SFT-side losses add the perplexity."""
    if not trainer.eval_data:
        raise UserError("config: eval_only=true needs eval data: n_eval_examples > 0 or eval_datasets")
    metrics = trainer.evaluate()
    if losses.data_kind(trainer.cfg.loss) == "sft" and "eval/loss" in metrics:
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 700.0))
    if trainer.is_main:
        run_dir = run_dir_of(trainer.cfg)
        os.makedirs(run_dir, exist_ok=True)
        model = resume_from or trainer.cfg.model.archive or trainer.cfg.model.name_or_path or "model.from_config"
        report = {"model": model, "loss": trainer.cfg.loss.name, "n_eval_examples": len(trainer.eval_data), **metrics}
        write_atomic(os.path.join(run_dir, "eval.json"), json.dumps(report, indent=1) + "\n")
        print("\n".join(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in report.items()))
        print(f"wrote {os.path.join(run_dir, 'eval.json')}")
    trainer.any_process(False)
    trainer.layout.close()
    return 0


def explain(error) -> tuple[str, int]:
    """The one line printed for an error that stops the run, and the exit code: 2 bad input, 1 training failed."""
    if isinstance(error, torch.OutOfMemoryError):
        return ("out of GPU memory: lower the micro-batch (raise gradient_accumulation_steps), set "
                "activation_checkpointing=true, lower max_length, or shard with trainer=FSDPTrainer", 1)
    return str(error), 2 if isinstance(error, (UserError, DataError)) else 1


STOPPING_ERRORS = (UserError, DataError, TrainingError, torch.OutOfMemoryError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(local_rank, world_size, port, config_path, overrides, error_dir):
    """One process of a one-machine FSDP run started by `launch_workers`: the environment torchrun would give it."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        code = main(config_path, overrides)
    except STOPPING_ERRORS as e:
        # every rank may find the same error; the launcher prints one. A file, not a queue: a killed worker leaves
        # no lock or semaphore behind
        message, code = explain(e)
        with open(os.path.join(error_dir, f"rank-{local_rank}.txt"), "w") as f:
            f.write(message)
    end_process(code)


def end_process(code):
    """End the process once everything is on disk (checkpoints fsynced, metrics and WandB closed, or its error
    reported), without the interpreter's teardown: it frees the objects of the ~5000 modules torch and transformers
    import one by one (0.9 s at the end of every run, a twentieth of a small one), and in distributed workers (ours
    or torchrun's) the teardown of torch's C++ threads has aborted finished processes (SIGABRT, "terminate called
    without an active exception") on a loaded machine. Log handlers are flushed and closed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def killed_worker(context, first):
    """(rank, pid, signal name) of a worker that a signal other than SIGTERM ended (kill -9, an OOM killer), or
    None; the first failure the launcher saw (rank `first`) before the others. When rank 0 dies, rank 1 fails in
    its next collective and may be the first failure seen: the killed one is the cause to report. SIGTERM is what
    the launcher itself sends the others when one fails (SIGKILL only to one that ignores it for 30 s)."""
    for rank in [first] + [r for r in range(len(context.processes)) if r != first]:
        process = context.processes[rank]
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return rank, process.pid, signal.Signals(-code).name
    return None


def launch_workers(args, cfg) -> int:
    """Plain `python train.py ... trainer=FSDPTrainer`: one worker per visible GPU, or fsdp.world_size CPU workers
    (gloo) on a machine without one. When any worker fails, the others are stopped (no hang) and we exit non-zero.
    SIGTERM / Ctrl-C are passed on to the workers, which save a checkpoint and stop together."""
    on_gpus = models.device_type(cfg) == "cuda"
    world_size = torch.cuda.device_count() if on_gpus else cfg.fsdp.world_size
    check_batch_split(cfg, world_size)  # the workers check it too (torchrun); here it fails before any is started
    # spawn logs a warning for each worker it stops after another failed; our own one line says it better
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as error_dir:
        context = mp.start_processes(worker, args=(world_size, free_port(), args.config, args.overrides, error_dir),
                                     nprocs=world_size, start_method="spawn", join=False)
        # SIGTERM (a scheduler's preemption) reaches only this process: pass it on. Ctrl-C reaches the workers from
        # the terminal already; passing it on too would count as a second Ctrl-C there (abort at once).
        forward = lambda signum, frame: [os.kill(p.pid, signum) for p in context.processes if p.is_alive()]  # noqa: E731
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
        try:
            while not context.join():
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            killed = killed_worker(context, e.error_index)  # the cause: its peers' errors follow from it
            if killed is not None:
                rank, pid, name = killed
                print(f"error: worker rank {rank} (pid {pid}) was killed by {name}; all {world_size} workers were "
                      "stopped", file=sys.stderr)
                return 1
            if isinstance(e, mp.ProcessRaisedException):
                print(f"error: worker rank {e.error_index} failed; all {world_size} workers were stopped:\n{e.msg}",
                      file=sys.stderr)
                return 1
            messages = sorted(os.listdir(error_dir))
            if messages:
                with open(os.path.join(error_dir, messages[0])) as f:
                    print(f"error: {f.read()}", file=sys.stderr)
                return e.exit_code
            if e.exit_code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                return e.exit_code  # stopped by a signal after saving; rank 0 printed how to resume
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
            print(f"error: worker rank {e.error_index} (pid {e.error_pid}) {how}; all {world_size} workers were "
                  "stopped", file=sys.stderr)
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


def cli(argv=None):
    sys.stdout, sys.stderr = SurvivingStream(sys.stdout), SurvivingStream(sys.stderr)  # `| tee` ended by Ctrl-C
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own bar is the one to watch; theirs would interleave with error lines
    try:
        cfg = load_config(args.config, args.overrides)  # main loads it again; here it picks the launcher
        if cfg.trainer == "FSDPTrainer" and "RANK" not in os.environ:
            return launch_workers(args, cfg)
        return main(args.config, args.overrides)
    except STOPPING_ERRORS as e:
        if args.traceback:
            raise
        message, code = explain(e)
        if is_main_process():  # under torchrun every rank finds the same input error: say it once
            print(f"error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C before training started (loading, tokenizing)
        abort_now()


if __name__ == "__main__":
    end_process(cli())
