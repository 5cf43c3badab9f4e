"""Checkpoints: a checkpoint folder written atomically (`save`: `<name>.tmp`, fsynced, trainer_state.json with every
file's size written last, then renamed), read back for an exact resume (`load`), and the run folder's checkpoints on
disk (listed, checked for damage, pruned, half-written ones cleaned up), and what a resume may change in the config
that produced a checkpoint (`config_changes`).

    <run>/step-000100/   config.json, model*.safetensors (policy_dtype), tokenizer, config.yaml,
                         training_state.pt (scheduler, scaler, RNG, counters; one device: optimizer + float32 masters),
                         dcp/ (sharded runs: optimizer + float32 masters, any world size), adapter/ (LoRA),
                         PPO: the critic's weights + optimizer in training_state.pt or critic_dcp/, final/critic/,
                         trainer_state.json (step, examples_seen, files: the mark of a complete folder)
    <run>/final/         the same, after the last step

`save`, `finish_save` and `load` take the trainer (trainers.Trainer) whose state they write or restore: its policy and
optimizer (whole, or sharded through its layout, whose collectives they call on every process) and the rest of its
state (`Trainer.state_dict`: counters, schedule, scaler, the loss's own state, RNG).
"""
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from omegaconf import OmegaConf

import adapters
import losses
import models
import sharding
from layouts import TRAINED_ONLY
from config import config_yaml, flat_keys
from utils import TrainingError, UserError, human_bytes, write_atomic


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading one checkpoint
# ----------------------------------------------------------------------------------------------------------------
def save(trainer, name):
    """An HF folder (model in policy_dtype, tokenizer, config.yaml, trainer_state.json) plus, with save_optimizer,
    training_state.pt (and dcp/ when sharded): everything `load` needs to continue exactly. Written to
    `<name>.tmp`, flushed and renamed, so a crash never leaves a half-written checkpoint under `name`; a failed
    save leaves the earlier checkpoints as they were. With fsdp.async_checkpoint a step checkpoint's dcp/ is
    written in the background: the folder is completed and renamed once every process has written it
    (`finish_save`, polled after each step)."""
    finish_save(trainer)  # one checkpoint in flight at a time
    final = os.path.join(trainer.run_dir, name)
    tmp = final + ".tmp"
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.any_process(False)  # a barrier: nobody writes into tmp before it is clean
    save_dtype = models.DTYPES[trainer.cfg.model.policy_dtype]
    adapter = None
    if trainer.cfg.model.lora is not None:  # the adapter; final/ also the merged model (gathered on the main process)
        full = trainer.layout.full_state_dict(trainer.policy, frozen=name == "final")  # collective
        adapter = {k: v for k, v in full.items() if adapters.is_adapter_key(k)}
        state = None if name != "final" else sharding.export_state(
            trainer.policy.get_base_model(), adapters.merged_state(trainer.policy, full), save_dtype)
    elif _export_shards(trainer, tmp, final, save_dtype):  # written by every process: nothing gathered
        state = None
    else:
        full = trainer.layout.full_state_dict(trainer.policy)  # collective
        state = sharding.export_state(trainer.policy, full, save_dtype)
    writing, critic = None, None
    if trainer.critic is not None and name == "final":  # PPO's critic, as a model transformers loads: final/critic/
        critic = sharding.export_state(trainer.critic, trainer.layout.full_state_dict(trainer.critic), save_dtype)
    if trainer.cfg.save_optimizer:  # collective under FSDP; written by every process
        writing = trainer.layout.save_sharded(trainer.policy, trainer.optimizer, os.path.join(tmp, "dcp"),
                                              background=trainer.cfg.fsdp.async_checkpoint and name != "final")
        if trainer.critic is not None:  # its shards beside the policy's (a future already done: written now)
            critic_writing = trainer.layout.save_sharded(trainer.critic, trainer.critic_optimizer,
                                                         os.path.join(tmp, "critic_dcp"))
            if critic_writing is not None:
                critic_writing.result()
    if trainer.is_main:
        try:
            write_files(trainer, tmp, state, adapter)
            if critic is not None:
                trainer.critic.save_pretrained(os.path.join(tmp, "critic"), state_dict=critic)
                trainer.tokenizer.save_pretrained(os.path.join(tmp, "critic"))
        except Exception as e:  # disk full, quota, I/O error: OSError, or RuntimeError from torch's zip writer
            raise _failed(trainer, tmp, final, write_failure(e, trainer.run_dir)) from e
    trainer.pending_save = writing, tmp, final, {"step": trainer.step, "examples_seen": trainer.examples_seen}
    if writing is None or not trainer.cfg.fsdp.async_checkpoint or name == "final":
        finish_save(trainer)
    return final


def finish_save(trainer, wait=True):
    """Complete the checkpoint `save` started, once every process has written its files: trainer_state.json
    (the mark of a complete folder, with every file's size), then the rename. wait=False: only if every process
    is done already (else it is tried again after the next step). A failed write on any process fails the save
    on all of them, with the earlier checkpoints kept."""
    if trainer.pending_save is None:
        return
    writing, tmp, final, counters = trainer.pending_save
    if not wait and trainer.any_process(writing is not None and not writing.done()):
        return
    trainer.pending_save, error = None, None
    try:
        if writing is not None:
            writing.result()
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        error = e
    if trainer.any_process(error is not None):  # also the barrier: every process's files are on disk
        why = write_failure(error, trainer.run_dir) if error else "another process failed to write it"
        raise _failed(trainer, tmp, final, why) from error
    if not trainer.is_main:
        return
    try:
        for root, _, files in os.walk(tmp):  # on disk before the rename makes the checkpoint visible
            for file in files:
                with open(os.path.join(root, file), "rb") as f:
                    os.fsync(f.fileno())
        # written last: marks the folder complete; the file sizes let a resume tell a truncated file from a good one
        write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps({**counters, "files": checkpoint_files(tmp)}))
        replace_checkpoint(tmp, final)
    except Exception as e:
        raise _failed(trainer, tmp, final, write_failure(e, trainer.run_dir)) from e
    if trainer.cfg.save_total_limit:
        prune_checkpoints(trainer.run_dir, trainer.cfg.save_total_limit)


def _export_shards(trainer, tmp, final, dtype) -> bool:
    """layout.export_shards into `tmp`, its failure (disk full, ...) a failed save like any other."""
    try:
        return trainer.layout.export_shards(trainer.policy, tmp, dtype)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        raise _failed(trainer, tmp, final, write_failure(e, trainer.run_dir)) from e


def _failed(trainer, tmp, final, why) -> TrainingError:
    """A failed save: the half-written folder goes (main process), the earlier checkpoints stay."""
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainingError(f"could not save checkpoint {final}: {why} (earlier checkpoints are kept)")


def write_files(trainer, folder, state, adapter=None):
    """Everything but the sharded state and the completion mark (`finish_save`). `state`: the HF model's weights
    to export (LoRA: the merged weights, final/ only; None when export_shards wrote them or, for LoRA step
    checkpoints, there are none); `adapter`: LoRA's full adapter weights (under FSDP gathered from the shards)."""
    lora = trainer.cfg.model.lora is not None
    if lora:  # adapter/: adapter_model.safetensors + adapter_config.json (peft.PeftModel.from_pretrained)
        trainer.policy.save_pretrained(os.path.join(folder, "adapter"), state_dict=adapter, save_embedding_layers=False)
    if state is not None:
        (trainer.policy.get_base_model() if lora else trainer.policy).save_pretrained(folder, state_dict=state)
    elif not lora:  # the weights were written by every process (export_shards): the rest of save_pretrained
        trainer.policy.config.save_pretrained(folder)
        if getattr(trainer.policy, "generation_config", None) is not None:  # a scalar head has none
            trainer.policy.generation_config.save_pretrained(folder)
    if state is not None or not lora:
        with open(os.path.join(folder, "config.json")) as f:  # save_pretrained records the float32 master dtype
            hf_config = json.load(f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**hf_config, "dtype": trainer.cfg.model.policy_dtype}, f, indent=2)
    trainer.tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(config_yaml(trainer.cfg))
    if trainer.cfg.save_optimizer:
        state = trainer.state_dict()
        if trainer.layout.mesh is None:  # sharded runs keep optimizer state and float32 weights in dcp/
            state["optimizer"] = trainer.optimizer.state_dict()
            # the float32 masters under their own names: the export may be rounded (half precision) or renamed
            # (transformers saves some heads under other names, e.g. GPT-NeoX's lm_head as embed_out)
            # (LoRA: the adapter's float32 weights; the frozen base is rebuilt from the config)
            state["master_weights"] = adapters.adapter_state(trainer.policy) if lora else trainer.policy.state_dict()
            if trainer.critic is not None:  # PPO: the critic's float32 weights and optimizer
                state["critic"] = {"weights": trainer.critic.state_dict(),
                                   "optimizer": trainer.critic_optimizer.state_dict()}
        torch.save(state, os.path.join(folder, "training_state.pt"))


def load_weights(trainer, folder, master_weights):
    """The float32 masters into the policy, every key accounted for (strict): a checkpoint of another
    architecture is one line naming the first key that differs."""
    lora = trainer.cfg.model.lora is not None
    live = adapters.adapter_state(trainer.policy) if lora else trainer.policy.state_dict()
    for key, value in master_weights.items():
        if key in live and live[key].shape != value.shape:
            raise UserError(f"resume: {folder} does not match the model: '{key}' is {list(value.shape)} in the "
                            f"checkpoint but {list(live[key].shape)} in the model (was the architecture changed?)")
    missing, unexpected = set(live) - set(master_weights), set(master_weights) - set(live)
    if missing or unexpected:
        what = (f"missing {sorted(missing)[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
            (f"unexpected {sorted(unexpected)[:3]}" if unexpected else "")
        raise UserError(f"resume: {folder} does not match the model: {what} (was the architecture changed?)")
    trainer.policy.load_state_dict(master_weights, strict=not lora)


def load(trainer, folder):
    """Continue from a checkpoint written by `save`: weights, optimizer, scheduler, scaler, counters, RNG."""
    path = os.path.join(folder, "training_state.pt")
    if not os.path.isfile(path):
        raise UserError(f"resume: {folder} holds no training state (saved with save_optimizer=false): it can start "
                        "a new run as model.archive, but cannot be resumed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in state:  # written by a sharded run: weights and optimizer from dcp/, any world size
        load_sharded_state(trainer, folder)
        if trainer.critic is not None:
            load_sharded_state(trainer, folder, trainer.critic, trainer.critic_optimizer, "critic_dcp")
    else:
        if trainer.critic is not None:
            if "critic" not in state:
                raise UserError(f"resume: {folder} holds no critic: it was not written by a run with one")
            trainer.critic.load_state_dict(state["critic"]["weights"])
            trainer.critic_optimizer.load_state_dict(state["critic"]["optimizer"])
        if state.get("master_weights") is None:  # written before the masters were always kept: the export
            head = models.auto_class(losses.LOSSES[trainer.cfg.loss.name].head)  # through transformers, which knows
            state["master_weights"] = head.from_pretrained(folder, dtype=torch.float32).state_dict()  # its key names
        load_weights(trainer, folder, state["master_weights"])
        try:
            trainer.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"resume: {folder}: its optimizer state does not fit this run (optimizer or "
                            f"architecture changed?): {e}") from e
    with open(os.path.join(folder, "trainer_state.json")) as f:
        counters = json.load(f)  # the counters of the completed folder (older versions kept them only here)
    trainer.load_state_dict({**state, "step": counters["step"], "examples_seen": counters["examples_seen"]})


def load_sharded_state(trainer, checkpoint_dir, model=None, optimizer=None, folder="dcp"):
    """Restore policy and optimizer (or another trained `model` and its `optimizer`: PPO's critic, from critic_dcp/)
    from `<checkpoint_dir>/dcp` (written by a sharded run's save) into `trainer`, sharded or not and at any world size
    (DCP reshards on load); returns trainer_state.json ({step, examples_seen})."""
    model, optimizer = model or trainer.policy, optimizer or trainer.optimizer
    path = os.path.join(checkpoint_dir, folder)
    if not os.path.isdir(path):
        raise UserError(f"{checkpoint_dir}: no sharded training state ({folder}/) to resume from")
    state = {"model": get_model_state_dict(model, options=TRAINED_ONLY),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=TRAINED_ONLY)}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # one process (OneDevice) reads it all
    # not strict: the frozen base (LoRA) is not in it; every trained key is (dcp.load fails on one the files lack)
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=TRAINED_ONLY)
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return json.load(f)


def load_weights_only(trainer, folder):
    """eval_only: a checkpoint's policy weights, never its optimizer state, and the counters and loss state that
    evaluation reads. The float32 masters of training_state.pt (memory-mapped: its optimizer tensors are not read),
    else dcp/'s model part (a sharded run), else the exported model (LoRA: adapter/); so a checkpoint saved with
    save_optimizer=false, or whose training_state.pt lacks the optimizer, evaluates too."""
    path, lora = os.path.join(folder, "training_state.pt"), trainer.cfg.model.lora is not None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if os.path.isfile(path) else {}
    if state.get("master_weights") is not None and trainer.layout.mesh is None:
        load_weights(trainer, folder, state["master_weights"])
    elif os.path.isdir(os.path.join(folder, "dcp")):
        weights = {"model": get_model_state_dict(trainer.policy, options=TRAINED_ONLY)}
        dcp.load(weights, checkpoint_id=os.path.join(folder, "dcp"), no_dist=not dist.is_initialized())
        set_model_state_dict(trainer.policy, weights["model"],
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
    elif lora and trainer.layout.mesh is None:
        adapters.load_adapter_weights(trainer.policy, os.path.join(folder, "adapter"))
    elif not lora:  # through transformers, which knows the export's key names
        head = models.auto_class(losses.LOSSES[trainer.cfg.loss.name].head)
        full = head.from_pretrained(folder, dtype=torch.float32).state_dict()
        if trainer.layout.mesh is None:
            load_weights(trainer, folder, full)
        else:
            set_model_state_dict(trainer.policy, full, options=StateDictOptions(full_state_dict=True))
    else:
        raise UserError(f"resume: {folder} holds no sharded weights (dcp/): evaluate it with trainer=BasicTrainer")
    with open(os.path.join(folder, "trainer_state.json")) as f:
        counters = json.load(f)
    trainer.step, trainer.examples_seen = counters["step"], counters["examples_seen"]
    if "loss_state" in state:  # bco_pair's running mean shifts its eval loss too
        trainer.objective.load_state_dict(state["loss_state"])


# ----------------------------------------------------------------------------------------------------------------
# The run folder's checkpoints: <run>/step-000100, <run>/final; written as <name>.tmp and renamed when complete
# ----------------------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir, resumable=False) -> list:
    """Complete checkpoints in the run folder as (step, path), oldest first; resumable=True: only those that hold
    the optimizer/RNG state. Half-written ones (`*.tmp`) are never listed."""
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        state = os.path.join(path, "trainer_state.json")
        if name.endswith((".tmp", ".old")) or not os.path.isfile(state):
            continue
        if resumable and not os.path.isfile(os.path.join(path, "training_state.pt")):
            continue
        try:
            with open(state) as f:
                found.append((json.load(f)["step"], name == "final", path))
        except (ValueError, KeyError, OSError):  # unreadable: not a complete checkpoint
            continue
    return [(step, path) for step, _, path in sorted(found)]


def checkpoint_files(folder) -> dict:
    """{relative path: size in bytes} of every file in a checkpoint folder (recorded in trainer_state.json)."""
    return {os.path.relpath(os.path.join(root, f), folder): os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(folder) for f in files}


def checkpoint_problem(folder):
    """Why a checkpoint cannot be trusted (a file missing or cut short since it was written), or None."""
    with open(os.path.join(folder, "trainer_state.json")) as f:
        expected = json.load(f).get("files", {})  # absent in checkpoints of older versions: nothing to compare
    for name, size in expected.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def replace_checkpoint(tmp, final):
    """Make the complete folder `tmp` the checkpoint `final`. An existing `final` (a resumed run's) is moved aside
    as `final.old` first and removed last, so some complete `final` exists at every instant but one rename (and
    `remove_partial_checkpoints` puts `final.old` back if a crash comes between the two renames)."""
    if os.path.exists(final):
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def remove_partial_checkpoints(run_dir):
    """A crash during a save leaves `<name>.tmp` (never used: removed at the next start), and a crash while a
    checkpoint is replaced may leave its previous version as `<name>.old` (restored when `<name>` is gone)."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        if name.endswith(".tmp") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".old") and os.path.isdir(path):
            if os.path.exists(path[:-4]):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, path[:-4])


def first_failure(error):
    """A torch.distributed.checkpoint failure (CheckpointException: every failed rank's error and traceback) as its
    first rank's error; any other error as it is."""
    failures = getattr(error, "failures", None)
    return next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else error


def write_failure(error, folder) -> str:
    """What went wrong in a failed write, in a few words: the OS's reason, or (torch's zip writer raises a
    RuntimeError of several lines) "write failed", with the space left when the disk is (nearly) full. A
    torch.distributed.checkpoint failure speaks by its first rank's error (first_failure)."""
    error = first_failure(error)
    reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0][:200]
    if not isinstance(error, OSError):
        reason = f"write failed ({type(error).__name__})"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    return reason if free > 2**30 else f"{reason}; {human_bytes(free)} free on that disk"


def prune_checkpoints(run_dir, keep):
    """Keep the newest `keep` step-N checkpoints; `final` is never removed."""
    steps = [path for _, path in list_checkpoints(run_dir) if os.path.basename(path).startswith("step-")]
    for path in steps[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)


# What a resumed run may change without changing the maths of what it trains: run length, logging, evaluation,
# saving, the process layout and memory/speed options. Any other difference from the saved config is refused.
MAY_CHANGE_ON_RESUME = ("n_epochs", "n_examples", "print_log_step", "eval_every_steps", "eval_batch_size",
                        "eval_only", "do_first_eval", "sample_during_eval", "n_eval_model_samples", "max_new_tokens",
                        "sample_temperature", "sample_top_p", "save_model_step", "save_optimizer", "save_total_limit",
                        "report_to_tensorboard", "wandb", "resume", "overwrite", "resume_allow_changes", "debug",
                        "exp_name", "output_dirs", "device", "trainer", "fsdp", "gradient_accumulation_steps",
                        "activation_checkpointing", "compile", "max_nonfinite_steps", "precompute_reference_logps",
                        "reference_cache_dir", "model.attn_implementation", "prefix_sharing")


def config_changes(saved, new) -> tuple[list, list]:
    """The keys whose values differ between a run's saved config and a new one, as 'key: old -> new', split into
    (changes the maths, may change: MAY_CHANGE_ON_RESUME). Lists (datasets) compare as whole values."""
    old, now = flat_keys(OmegaConf.to_container(saved)), flat_keys(OmegaConf.to_container(new))
    changed = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    allowed = lambda key: any(key == a or key.startswith(a + ".") for a in MAY_CHANGE_ON_RESUME)  # noqa: E731
    text = lambda key: f"{key}: {old.get(key)} -> {now.get(key)}"  # noqa: E731
    return [text(k) for k in changed if not allowed(k)], [text(k) for k in changed if allowed(k)]
