"""Entry point: config -> tokenizer, data, models -> trainer -> run folder.

    python train.py example/tiny-dpo.yml
    python train.py example/pythia28-dpo.yml --overrides lr=2e-5 batch_size=32
    python train.py example/pythia28-dpo.yml --overrides trainer=FSDPTrainer      # one worker per GPU (CPU: fsdp.world_size)
    torchrun --nproc_per_node 8 train.py example/pythia28-dpo.yml --overrides trainer=FSDPTrainer

Everything that can fail because of the user's input (config, data, model paths) is checked BEFORE anything is
written to the run folder, so a bad run never clobbers a good one. Such failures print one line and exit with code 2.
"""
import argparse
import copy
import inspect
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import warnings

from utils import (TrainingError, UserError, abort_now, check_hub_reachable, checkpoint_problem, choices, config_yaml,
                   human_bytes, list_checkpoints, load_config, remove_partial_checkpoints, set_seed, write_atomic)


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


def check_config_first(argv=None):
    """`python train.py`: the config is loaded and checked before torch and transformers are imported (seconds), so
    that a mistake in it is reported in about a second. cli loads it again."""
    args = parse_args(argv)
    try:
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

import data  # noqa: E402
from trainers import DTYPES, VARLEN_ATTN, BasicTrainer, FSDPTrainer, check_batch_split, data_kind  # noqa: E402

TRAINER_CLASSES = {"BasicTrainer": BasicTrainer, "FSDPTrainer": FSDPTrainer}


def is_main_process() -> bool:
    """Rank 0 (or the only process) prints; under torchrun and our own launcher RANK is in the environment."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(cfg) -> torch.device:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config: device={cfg.device} but CUDA is not available on this machine (use device=cpu)")
    if device.type == "cuda" and cfg.model.policy_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UserError("config: model.policy_dtype=bfloat16 is not supported by this GPU; use float16 or float32")
    flags = cpu_flags() if device.type == "cpu" and cfg.model.policy_dtype == "bfloat16" else {"bf16"}
    if flags and not flags & {"avx512_bf16", "amx_bf16", "bf16"} and is_main_process():  # bf16: ARM's flag
        print("warning: model.policy_dtype=bfloat16 on a CPU without native bfloat16 instructions (no avx512_bf16 / "
              "amx_bf16 in /proc/cpuinfo) runs about 10x slower than float32: consider model.policy_dtype=float32",
              file=sys.stderr)
    return device


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo: 'flags' on x86, 'Features' on ARM); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith(("flags", "Features"))),
                        set())
    except OSError:
        return set()


def from_pretrained(loader, path, key, **kwargs):
    """transformers' from_pretrained with a one-line error naming the config key when the path cannot be loaded."""
    local = os.path.expanduser(path)
    if (path.startswith((".", "/", "~")) or path.count("/") > 1) and not os.path.exists(local):
        raise UserError(f"config: {key}: '{path}' does not exist")
    gguf = sorted(f for f in os.listdir(local) if f.endswith(".gguf")) if os.path.isdir(local) else []
    if gguf and not os.path.exists(os.path.join(local, "config.json")):
        raise UserError(f"config: {key}: '{path}' holds only GGUF files ({', '.join(gguf[:3])}"
                        f"{', ...' if len(gguf) > 3 else ''}): convert to a Hugging Face folder (save_pretrained) first")
    check_hub_reachable(path, key)  # a hub id without network: fail in seconds, not after a minute of retries
    try:
        return loader.from_pretrained(local, **kwargs)
    except (OSError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__  # all of it on one line, within reason
        if "trust_remote_code=True" in detail:
            raise UserError(f"config: {key}: '{path}' needs its own model code (auto_map in its config), which runs "
                            "only with model.trust_remote_code=true: set it if you trust that code") from e
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        where = "the local folder" if os.path.exists(local) else "the hub (no such model, or no access?)"
        raise UserError(f"config: {key}: could not load '{path}' from {where}: {detail}") from e


def build_tokenizer(cfg):
    from transformers import AutoTokenizer
    key = "model.tokenizer_name_or_path" if cfg.model.tokenizer_name_or_path else "model.name_or_path"
    path = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    tokenizer = from_pretrained(AutoTokenizer, path, key, trust_remote_code=cfg.model.trust_remote_code)
    return data.prepare_tokenizer(tokenizer)


def disable_dropout(config_or_model):
    """DPO compares log-probs of two models: dropout would make them noisy, so it is switched off everywhere."""
    if isinstance(config_or_model, torch.nn.Module):
        for module in config_or_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return config_or_model
    for name, value in list(vars(config_or_model).items()):
        if "dropout" in name and isinstance(value, float):
            setattr(config_or_model, name, 0.0)
    return config_or_model


def pickle_imports(path) -> bool:
    """Whether a (legacy, not zipped) pickle file imports or calls anything: read opcode by opcode, never run."""
    import pickletools
    try:
        with open(path, "rb") as f:
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE") for op, _, _ in pickletools.genops(f))
    except Exception:  # not a complete pickle: damaged
        return False


def load_archive(model, path):
    """Weights from a `.pt` state dict (or {'state': state_dict}, as the original project saved), tensors only."""
    if not os.path.isfile(path):
        raise UserError(f"config: model.archive: '{path}' does not exist")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch's zip format / a pickle (torch's legacy format)
        hint = ": give the model's folder instead" if path.endswith(".safetensors") else ""
        raise UserError(f"config: model.archive: {path}: not a torch state dict file (neither torch's zip format "
                        f"nor a pickle){hint}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or magic != b"PK" and not pickle_imports(path):  # damaged
            raise UserError(f"config: model.archive: {path}: not a loadable torch state dict (damaged?)") from e
        raise UserError(f"config: model.archive: {path}: refused: the file holds Python objects other than tensors "
                        "(possibly code); only plain state dicts load (torch.load weights_only=True)") from e
    except Exception as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"config: model.archive: {path}: not a loadable torch state dict: {detail}") from e
    if isinstance(state, dict) and isinstance(state.get("state"), dict):
        state = state["state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"config: model.archive: {path}: expected a dict of tensors (a state dict)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"config: model.archive: {path}: does not match the model architecture: {detail}") from e


try:  # PyTorch's own FlashAttention varlen kernel (torch >= 2.10, CUDA), and the arguments this version takes
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, VARLEN_PARAMS = None, frozenset()


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """Causal attention within each segment of a flattened batch: the transformers attention function behind
    `model.attn_implementation: varlen_attn` (registered by `build_policy`).

    query [B, H, T, D], key / value [B, Hkv, T, D]; cu_seq_lens_q [S + 1] int32: where each of the S segments of
    the B*T tokens starts (data.collate: every sequence, and the padding at each row's end), max_length_q the
    longest. Returns ([B, T, H, D], None). On CUDA in bfloat16/float16 it is PyTorch's FlashAttention varlen kernel
    (torch.nn.attention.varlen): no [T, T] mask, no FLOPs across sequences or on padding, no per-shape planning.
    Elsewhere (CPU, float32) it is SDPA over each segment in turn: the same maths, slowly. Without segments
    (generate) it is transformers' SDPA with the mask transformers built.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, T, D = query.shape  # plain causal attention: build_policy refused sliding windows and softcapping
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value))
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    if q.is_cuda and dtype in (torch.bfloat16, torch.float16):
        out = flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seq_lens_q, max_length_q, scaling)
    else:
        out = segment_sdpa(q, k, v, cu_seq_lens_q, scaling)
    return out.reshape(B, T, H, D), None


@torch.compiler.disable  # a loop over data-dependent lengths: compiled, it would be re-traced for every batch
def segment_sdpa(q, k, v, cu_seq_lens, scale):
    """The CPU / float32 path of varlen_attention: causal SDPA over each segment; q [N, H, D], k / v [N, Hkv, D]."""
    bounds = cu_seq_lens.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])])


def flash_varlen(q, k, v, cu_seq_lens, max_length, scale):
    """PyTorch's varlen_attn, causal; q [N, H, D], k / v [N, Hkv, D] -> [N, H, D]. Its signature grew from torch 2.10
    (is_causal) to 2.11+ (window_size, scale, enable_gqa): this passes what the installed version takes."""
    extra = {"window_size": (-1, 0)} if "window_size" in VARLEN_PARAMS else {"is_causal": True}
    if "scale" in VARLEN_PARAMS:
        extra["scale"] = scale
    elif scale is not None:  # the kernel scales by D**-0.5: fold the model's own scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in VARLEN_PARAMS:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **extra)


def register_varlen_attention(device, policy_dtype="bfloat16"):
    """Make `varlen_attn` a transformers attention implementation (its documented AttentionInterface); its mask,
    used only when there are no segments (generate), is SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    if device.type == "cuda" and varlen_attn is None:
        raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} needs torch >= 2.10 on a GPU (this is "
                        f"torch {torch.__version__}): upgrade torch or use sdpa")
    if device.type == "cuda" and policy_dtype == "float32":
        raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} runs its GPU kernel in bfloat16 or float16: "
                        "set model.policy_dtype=bfloat16, or use sdpa for float32")
    AttentionInterface.register(VARLEN_ATTN, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTN, sdpa_mask)


def model_from_config(arch, tokenizer, kwargs):
    """A randomly initialised model from `model.from_config`; any mistake in it is one line naming that key."""
    from huggingface_hub.errors import StrictDataclassError  # what transformers' config validators raise
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if model_type is None:
        raise UserError("config: model.from_config needs a model_type, e.g. llama, qwen2, gpt_neox")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"config: model.from_config.model_type={model_type!r} is not one of "
                        f"{choices(model_type, sorted(CONFIG_MAPPING.keys()), limit=8)}")
    arch.setdefault("vocab_size", len(tokenizer))
    try:  # the config checks its own fields (heads that do not divide hidden_size, ...), the model class the rest
        config = disable_dropout(AutoConfig.for_model(model_type, **arch))
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"config: model.from_config: {detail if len(detail) <= 400 else detail[:400] + ' ...'}") from e


def build_policy(cfg, tokenizer, device):
    """The trainable model, float32 master weights (autocast supplies the compute dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    m = cfg.model
    kwargs = {"trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.attn_implementation == VARLEN_ATTN:
        register_varlen_attention(device, m.policy_dtype)
    archive_is_folder = bool(m.archive) and os.path.isdir(m.archive)
    try:
        if m.name_or_path is None and not archive_is_folder:
            model = model_from_config(m.from_config, tokenizer, kwargs)
        else:
            source, key = (m.archive, "model.archive") if archive_is_folder else (m.name_or_path, "model.name_or_path")
            config = disable_dropout(from_pretrained(AutoConfig, source, key, trust_remote_code=m.trust_remote_code))
            model = from_pretrained(AutoModelForCausalLM, source, key, config=config, dtype=torch.float32, **kwargs)
    except ImportError as e:  # flash_attention_2 / _3 without their package
        if not m.attn_implementation:
            raise
        raise UserError(f"config: model.attn_implementation={m.attn_implementation}: {' '.join(str(e).split())[:300]}"
                        " (or use sdpa)") from e
    if m.archive and not archive_is_folder:
        load_archive(model, m.archive)
    if m.attn_implementation == VARLEN_ATTN and (any(getattr(mod, "sliding_window", None) for mod in model.modules())
                                                 or getattr(model.config, "attn_logit_softcapping", None)):
        raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} supports plain causal attention only; this "
                        "model has sliding-window attention or softcapping: use sdpa")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                        f"{model.get_input_embeddings().weight.shape[0]}: they do not belong together")
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainer == "FSDPTrainer":  # it moves the weights to the GPU one block at a time as it shards them
        return disable_dropout(model)
    return disable_dropout(model).to(device)


def build_reference(cfg, policy):
    """A frozen copy of the initial policy (in reference_dtype when set); None when the loss needs no reference."""
    if cfg.loss.name == "sft" or cfg.loss.reference_free:
        return None
    reference = copy.deepcopy(policy)
    if cfg.activation_checkpointing:
        reference.activation_checkpointing_disable()  # forward-only: nothing to recompute
    # by default the reference IS the initial policy: float32 weights under the same autocast, so that before any
    # update policy and reference agree exactly (rewards 0); reference_dtype stores it in half precision instead
    dtype = DTYPES[cfg.model.reference_dtype or "float32"]
    return reference.to(dtype).eval().requires_grad_(False)


def build_data(cfg, tokenizer):
    specs = [dict(s) for s in cfg.datasets]
    eval_specs = [dict(s) for s in cfg.eval_datasets]
    train, evaluation, stats = data.build_datasets(specs, eval_specs, tokenizer, data_kind(cfg.loss.name), cfg.max_length,
                                                   cfg.max_prompt_length, cfg.n_eval_examples, cfg.seed)
    notes = stats.pop("warnings", [])
    if is_main_process():
        for line in notes:
            print(line, file=sys.stderr)
        print("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return train, evaluation


def run_dir_of(cfg) -> str:
    return os.path.abspath(os.path.expanduser(cfg.output_dirs))


def resolve_resume(cfg) -> list:
    """The checkpoints to continue from, the preferred first ([] to start afresh); refuses to mix a new run into an
    old run's folder. resume=auto lists the run's resumable checkpoints newest first, leaving out (with a warning)
    any whose files were cut short or removed since they were written."""
    run_dir = run_dir_of(cfg)
    if cfg.resume is None:
        old_run = any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.yaml", "metrics.jsonl"))
        if old_run and not cfg.overwrite:
            raise UserError(f"config: output_dirs '{run_dir}' already holds a run: continue it with resume=auto, or "
                            "start afresh with overwrite=true (removes its files)")
        return []
    if cfg.resume == "auto":
        found = []
        for _, path in reversed(list_checkpoints(run_dir, resumable=True)):
            problem = checkpoint_problem(path)
            if problem and is_main_process():
                print(f"warning: checkpoint {path} is damaged ({problem}): skipped", file=sys.stderr)
            found += [] if problem else [path]
        return found
    if not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise UserError(f"config: resume: '{cfg.resume}' is not a complete checkpoint folder (no trainer_state.json); "
                        "use resume=auto or a step-N / final folder of a run")
    problem = checkpoint_problem(cfg.resume)
    if problem:
        raise UserError(f"resume: checkpoint {cfg.resume} is damaged ({problem}): resume from an earlier one")
    return [cfg.resume]


def load_newest(trainer, candidates):
    """Load the first checkpoint of `candidates` that loads; with resume=auto an unreadable one (corrupt in a way
    its file sizes do not show) is skipped with a warning. Returns the path, or None for a fresh start."""
    for i, path in enumerate(candidates):
        try:
            trainer.load_checkpoint(path)
            return path
        except Exception as e:  # whatever torch.load / safetensors raise for a damaged file
            if trainer.cfg.resume != "auto" or isinstance(e, UserError) and "does not match" in str(e):
                raise e if isinstance(e, UserError) else UserError(f"resume: cannot read {path}: {e}") from e
            if trainer.is_main:
                print(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): skipped",
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


def prepare_run_dir(cfg, n_params=0, fresh=True, lock=None):
    """Create the run folder and lock it, empty it first for overwrite=true, drop half-written checkpoints, check
    it can hold a checkpoint, save the resolved config. Called only once every input has been checked; nothing is
    written into the folder before the space check has passed."""
    run_dir = run_dir_of(cfg)
    existing = run_dir
    while not os.path.exists(existing):  # the disk it will be on
        existing = os.path.dirname(existing)
    export_bytes = DTYPES[cfg.model.policy_dtype].itemsize
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
        remove_partial_checkpoints(run_dir)
        write_atomic(os.path.join(run_dir, "config.yaml"), config_yaml(cfg))
    except OSError as e:
        raise UserError(f"config: output_dirs: cannot write to '{run_dir}': {e.strerror or e}") from e
    return run_dir, lock


def check_versions():
    """Log-probs are taken only at label positions through a boolean `logits_to_keep`, new in transformers 5.24."""
    import transformers
    if tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) < (5, 24):
        raise UserError(f"transformers {transformers.__version__} is too old: this project needs >= 5.24 "
                        "(pip install -r requirements.txt)")


def build_trainer(cfg):
    """Everything the run needs, checked and loaded; nothing is written yet."""
    check_versions()
    set_seed(cfg.seed)
    device = pick_device(cfg)
    if cfg.trainer == "FSDPTrainer" and device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process; "cuda" now means this one
    tokenizer = build_tokenizer(cfg)
    train_data, eval_data = build_data(cfg, tokenizer)
    policy = build_policy(cfg, tokenizer, device)
    reference = build_reference(cfg, policy)
    return TRAINER_CLASSES[cfg.trainer](cfg, policy, reference, tokenizer, train_data, eval_data, run_dir_of(cfg))


def main(config_path, overrides=()):
    """Returns the exit code: 0 finished, 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint."""
    cfg = load_config(config_path, overrides)
    # an existing run folder is locked first: another run's checkpoints may otherwise change while we read them
    lock = take_run_lock(run_dir_of(cfg)) if is_main_process() and os.path.isdir(run_dir_of(cfg)) else None
    try:
        candidates = resolve_resume(cfg)
        trainer = build_trainer(cfg)
        resume_from = load_newest(trainer, candidates)
        n_params = sum(p.numel() for p in trainer.policy.parameters())  # a sharded DTensor counts its full size
        failed = None
        if trainer.is_main:  # only now, once every input has been checked
            try:
                _, lock = prepare_run_dir(cfg, n_params, fresh=resume_from is None, lock=lock)
            except UserError as e:
                failed = e
        if trainer.any_process(failed is not None):  # every rank stops, none waits for rank 0 in a collective
            raise failed or UserError("rank 0 could not prepare the run folder")
        if trainer.is_main:
            start = f"resuming from {resume_from} at step {trainer.step}" if resume_from else "starting"
            print(f"run folder: {trainer.run_dir} | {start} | device: {trainer.device} x {trainer.world_size} | policy: "
                  f"{n_params / 1e6:.2f}M params | {trainer.total_steps} steps of {cfg.total_batch_size} examples")
        status = trainer.train()
    finally:
        if lock is not None:
            os.close(lock)
    if status == "interrupted" and trainer.is_main:
        again = " ".join(["python train.py", config_path, "--overrides", *overrides, "resume=auto"])
        print(f"stopped at step {trainer.step} with a checkpoint; continue with:\n  {again}", flush=True)
    trainer.any_process(False)  # a barrier: no worker exits (a launcher then stops the rest) before rank 0 has reported
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 128 + trainer.stop_signal if status == "interrupted" else 0


def explain(error) -> tuple[str, int]:
    """The one line printed for an error that stops the run, and the exit code: 2 bad input, 1 training failed."""
    if isinstance(error, torch.OutOfMemoryError):
        return ("out of GPU memory: lower the micro-batch (raise gradient_accumulation_steps), set "
                "activation_checkpointing=true, lower max_length, or shard with trainer=FSDPTrainer", 1)
    return str(error), 2 if isinstance(error, (UserError, data.DataError)) else 1


STOPPING_ERRORS = (UserError, data.DataError, TrainingError, torch.OutOfMemoryError)


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
    sys.exit(code)


def launch_workers(args, cfg) -> int:
    """Plain `python train.py ... trainer=FSDPTrainer`: one worker per visible GPU, or fsdp.world_size CPU workers
    (gloo) on a machine without one. When any worker fails, the others are stopped (no hang) and we exit non-zero.
    SIGTERM / Ctrl-C are passed on to the workers, which save a checkpoint and stop together."""
    on_gpus = torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")
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
        except mp.ProcessExitedException as e:
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
        except mp.ProcessRaisedException as e:
            print(f"error: worker rank {e.error_index} failed; all {world_size} workers were stopped:\n{e.msg}",
                  file=sys.stderr)
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


def cli(argv=None):
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
    sys.exit(cli())
