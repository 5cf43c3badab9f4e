"""Everything about networks: devices, loading the policy, attention kernels, the reference, the forward pass to
log-probs and scores (sharding and export names: sharding.py; FLOP accounting: flops.py).

    models.build_models(cfg, tokenizer, layout) -> (policy, reference, critic or None)

`layout` (layouts.OneDevice or layouts.FSDPRanks) exists before any model is built: it says where the weights go
(one device, or shards over its device mesh). The reference is an object with one small interface, in four kinds:
`FrozenReference` (a frozen copy of the initial policy), `AdapterOffReference` (LoRA: the policy with its adapter
off), `PrecomputedReference` (log-probs computed once, from the disk cache) and `NoReference` (losses that need
none, or reference_free).
"""
import contextlib
import copy
import gc
import hashlib
import os
import pickle
import re
import sys
import warnings

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy
from torch.distributed.tensor import DTensor

import data
import logprobs
import losses
from adapters import (apply_lora, base_state, is_adapter_folder, merge_adapter_folder)
from attention import VARLEN_ATTN, register_varlen_attention
from config import DTYPE_NAMES, choices
from sharding import copy_shards, fill_from_main_process, find_block_class, shard_model
from utils import UserError, check_hub_reachable

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # config name -> torch dtype
# What a loss trains (losses.Loss.head) -> the transformers class that builds, loads and exports it. A classification
# head has one output: a sequence's reward (reward models), a token's value (a critic).
HEADS = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
         "token_classification": "AutoModelForTokenClassification"}


def auto_class(head):
    """The transformers Auto class of a head kind (HEADS)."""
    import transformers
    return getattr(transformers, HEADS[head])


def with_head(config, head):
    """A model config for `head`: classification heads with one output (num_labels=1)."""
    if head != "causal_lm":
        config.num_labels = 1
    return config


def is_main_process() -> bool:
    """Rank 0 (or the only process) prints; under torchrun and train.py's launcher RANK is in the environment."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------------------------
# Devices and loading
# ----------------------------------------------------------------------------------------------------------------
def device_type(cfg) -> str:
    """'cuda' or 'cpu': cfg.device, else cuda when there is a GPU (the one rule, for every process and launcher)."""
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def pick_device(cfg) -> torch.device:
    """This process's device: cfg.device (or cuda when available), and under FSDPTrainer on GPUs cuda:LOCAL_RANK,
    made the current device (one GPU per process). Refuses what cannot run here."""
    device = torch.device(cfg.device or device_type(cfg))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config: device={cfg.device} but CUDA is not available on this machine (use device=cpu)")
    if device.type == "cuda" and cfg.trainer == "FSDPTrainer":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
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


def check_versions():
    """Log-probs are taken only at label positions through a boolean `logits_to_keep`, new in transformers 5.24."""
    import transformers
    if tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) < (5, 24):
        raise UserError(f"transformers {transformers.__version__} is too old: this project needs >= 5.24 "
                        "(pip install -r requirements.txt)")


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


def model_from_config(arch, tokenizer, kwargs, head="causal_lm"):
    """A randomly initialised model from `model.from_config`; any mistake in it is one line naming that key."""
    from huggingface_hub.errors import StrictDataclassError  # what transformers' config validators raise
    from transformers import AutoConfig
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
        config = with_head(disable_dropout(AutoConfig.for_model(model_type, **arch)), head)
        return auto_class(head).from_config(config, dtype=torch.float32, **kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"config: model.from_config: {detail if len(detail) <= 400 else detail[:400] + ' ...'}") from e


def attention(cfg) -> str | None:
    """The attention implementation the models are built with: model.attn_implementation, and for null, varlen_attn
    when batches are packed on a CPU (not with compile, for which its loop over sequences is a graph break in every
    layer), else transformers' default (None). Why: SDPA over a packed row computes every query-key pair of the row
    under a block-diagonal mask (masked, not skipped), while varlen_attn's CPU path runs causal SDPA over each
    sequence alone (bench/README.md: about 8% of a packed SFT run on a small model), and over each branch of a
    prefix-sharing group with its shared keys."""
    if cfg.model.attn_implementation or not cfg.packing or cfg.compile:
        return cfg.model.attn_implementation
    return VARLEN_ATTN if device_type(cfg) == "cpu" else None


def prefix_sharing(cfg, model, device) -> bool:
    """cfg.prefix_sharing, and for null: on where it is never slower, off elsewhere. It is never slower with
    varlen_attn on a CPU: each branch's attention costs at most its separate sequence's (attention.segment_sdpa),
    and the shared part's other layers run once. SDPA's group mask costs more than two short sequences when the
    prompts are short, and GPU kernels with a custom mask are unmeasured."""
    if cfg.prefix_sharing is not None:
        return cfg.prefix_sharing
    return device.type == "cpu" and model.config._attn_implementation == VARLEN_ATTN


def load_policy(cfg, tokenizer, meta=False, head="causal_lm"):
    """The trainable model with the `head` its loss trains (HEADS), float32 master weights (autocast supplies the
    compute dtype), on the CPU. meta=True: the same model without its weights (on the meta device: no memory,
    nothing read), for `fill_from_main_process`."""
    from transformers import AutoConfig
    m = cfg.model
    kwargs = {"trust_remote_code": m.trust_remote_code}
    attn = attention(cfg)
    if attn:
        kwargs["attn_implementation"] = attn
    if attn == VARLEN_ATTN:
        register_varlen_attention(torch.device(device_type(cfg)), m.policy_dtype, cfg.prefix_sharing)
    # an adapter folder (adapter_config.json) is not the base: that comes from name_or_path / from_config
    archive_is_folder = bool(m.archive) and os.path.isdir(m.archive) and not is_adapter_folder(m.archive)
    try:
        if m.name_or_path is None and not archive_is_folder:
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = model_from_config(m.from_config, tokenizer, kwargs, head)
        else:
            source, key = (m.archive, "model.archive") if archive_is_folder else (m.name_or_path, "model.name_or_path")
            config = disable_dropout(from_pretrained(AutoConfig, source, key, trust_remote_code=m.trust_remote_code))
            config = with_head(config, head)
            if meta:
                with torch.device("meta"):
                    model = auto_class(head).from_config(config, dtype=torch.float32, **kwargs)
            else:
                model = from_pretrained(auto_class(head), source, key, config=config, dtype=torch.float32, **kwargs)
    except ImportError as e:  # flash_attention_2 / _3 without their package
        if not m.attn_implementation:
            raise
        raise UserError(f"config: model.attn_implementation={m.attn_implementation}: {' '.join(str(e).split())[:300]}"
                        " (or use sdpa)") from e
    if m.archive and not archive_is_folder and not is_adapter_folder(m.archive) and not meta:
        load_archive(model, m.archive)
    if attn == VARLEN_ATTN and (any(getattr(mod, "sliding_window", None) for mod in model.modules())
                                or getattr(model.config, "attn_logit_softcapping", None)):
        if m.attn_implementation:
            raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} supports plain causal attention only; "
                            "this model has sliding-window attention or softcapping: use sdpa")
        model.set_attn_implementation("sdpa")  # the default's choice only: transformers' masks handle these
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                        f"{model.get_input_embeddings().weight.shape[0]}: they do not belong together")
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return disable_dropout(model)


class AdapterOffReference:
    """LoRA's reference: the policy itself with its adapter switched off, i.e. the frozen base (no second copy)."""
    runs_forward, model = True, None  # no model to sample from: the base is the policy without its adapter

    def __init__(self, policy):
        self.policy = policy

    @torch.no_grad()
    def logps(self, batch, n_seqs):
        with self.policy.disable_adapter():
            return batch_logps(self.policy, batch, n_seqs)

    @torch.no_grad()
    def token_logps(self, batch, temperature=1.0):
        """[N] float32 log-probs of each labelled token (as models.token_logps), for per-token KL terms."""
        with self.policy.disable_adapter():
            return token_logps(self.policy, batch, temperature)[0]

    def fingerprint(self, settings) -> str:
        """The base weights under their plain names: the same cache file as a full run from the same weights."""
        return state_digest(base_state(self.policy.state_dict()), settings)


def initial_policy(cfg, tokenizer, base_dtype, meta=False):
    """The policy before its first step, with the head its loss trains (losses.Loss.head): the model (load_policy),
    as a LoRA model (model.lora), or with an adapter folder given as model.archive merged in. meta=True: its
    structure only (load_policy)."""
    head = losses.LOSSES[cfg.loss.name].head
    policy = load_policy(cfg, tokenizer, meta, head)
    adapter = cfg.model.archive if is_adapter_folder(cfg.model.archive) and not meta else None
    if cfg.model.lora is not None:
        return apply_lora(policy, cfg.model.lora, DTYPES[base_dtype], adapter, head)
    return merge_adapter_folder(policy, adapter) if adapter else policy


def build_models(cfg, tokenizer, layout):
    """(policy, reference, critic) for this run, placed as the layout says: on its device, or sharded over its mesh. The
    reference is a frozen copy of the initial policy when the loss needs one (losses.LOSSES). By default it IS the
    initial policy (float32 weights under the same autocast and the same FSDP mixed precision), so policy and
    reference agree exactly before any update; reference_dtype stores it in half precision instead. With LoRA the
    reference is the policy with its adapter off (no copy).

    Sharded (FSDPTrainer), no process ever holds more than one full copy: every process builds both models on the
    meta device (no memory), shards them, and fills its shards from the ONE copy that the main process reads
    (`fill_from_main_process`), a PPO critic from one more; a sharded reference then copies the policy's shards
    (`copy_shards`), once the full copy is freed, so rank 0 never holds it together with two models' shards.
    The critic (ppo.initial_critic) is None unless the loss's row has one."""
    sharded, lora = layout.mesh is not None, cfg.model.lora is not None
    # FSDP2 gathers one dtype per block: sharded, a LoRA base stays float32 (1/world of it on each process)
    base_dtype = "float32" if sharded else cfg.model.policy_dtype
    source = initial_policy(cfg, tokenizer, base_dtype) if sharded and layout.rank == 0 else None  # read first: the
    policy = initial_policy(cfg, tokenizer, base_dtype, meta=sharded)  # same random numbers as one device
    critic, critic_source = None, None
    if getattr(losses.LOSSES[cfg.loss.name].online, "critic", False):  # ppo: a value model (ppo.py)
        import ppo
        critic_source = ppo.initial_critic(cfg, tokenizer, source) if source is not None else None
        critic = ppo.initial_critic(cfg, tokenizer, policy, meta=sharded)
    reference = None
    if losses.needs_reference(cfg.loss) and not lora:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if cfg.activation_checkpointing:
            reference.activation_checkpointing_disable()  # forward-only: nothing to recompute
        reference.to(DTYPES[cfg.model.reference_dtype or "float32"])
    if not sharded:
        policy.to(layout.device)
        reference = reference.to(layout.device) if reference is not None else None
        critic = critic.to(layout.device) if critic is not None else None
    else:
        shard_policy_and_reference(cfg, layout, policy, reference, critic)
        replica = reference if reference is not None and not cfg.fsdp.shard_reference else None
        for model, full in ((policy, source), (critic, critic_source), (replica, source)):
            if model is not None:  # a replica (shard_reference: false) lives on the compute device
                fill_from_main_process(model, full, layout.device, cfg.fsdp.cpu_offload and isinstance(model, FSDPModule))
        # rank 0's full copy goes (every name of it) before a sharded reference is filled: that copies the policy's
        # shards, the same values, each process its own (no communication; rank 0 never holds the copy + 2 shards)
        del source, critic_source, full
        gc.collect()
        if reference is not None and replica is None:
            copy_shards(reference, policy, layout.device, cfg.fsdp.cpu_offload)
    if lora and losses.needs_reference(cfg.loss):
        return policy, AdapterOffReference(policy), critic
    return policy, FrozenReference(reference) if reference is not None else NoReference(), critic


def shard_policy_and_reference(cfg, layout, policy, reference, critic=None):
    """fully_shard the policy (and a critic) over the layout's mesh, the reference only with fsdp.shard_reference
    (else a replica on each device). Gathered weights in the compute dtype; gradients reduced in float32 into float32
    master shards."""
    block = find_block_class(policy, cfg.fsdp.block_class)
    mp_dtype = DTYPES[cfg.model.fsdp_policy_mp or cfg.model.policy_dtype]
    mixed = MixedPrecisionPolicy(param_dtype=None if mp_dtype == torch.float32 else mp_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.fsdp.cpu_offload else OffloadPolicy()
    for model in (policy, critic) if critic is not None else (policy,):
        shard_model(model, find_block_class(model, cfg.fsdp.block_class) if model is critic else block, layout.mesh,
                    mixed, offload)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # each process's loss is already divided by the GLOBAL normalizer: gradients must be summed, not
                # averaged. Plain SUM collectives (gloo has no PREMUL_SUM), then a division by 1.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    if reference is not None and cfg.fsdp.shard_reference:
        half = cfg.model.reference_dtype in ("bfloat16", "float16")  # else exactly the policy's compute
        shard_model(reference, block, layout.mesh, MixedPrecisionPolicy() if half else mixed, offload, frozen=True)
    # else: a full replica on every device (filled there by fill_from_main_process): no communication in its forward


# ----------------------------------------------------------------------------------------------------------------
# The forward pass to log-probs
# ----------------------------------------------------------------------------------------------------------------
def token_logps(model, batch, temperature=1.0):
    """Log-probs of every labelled token of a batch, in ONE forward pass over its rows (padded or packed:
    data.collate puts chosen and rejected responses side by side, so one pass scores both).

    Only the positions whose next token is a label reach the vocabulary projection (`logits_to_keep`), and the
    float32 log-softmax runs in chunks (logprobs.label_logps): a [rows, tokens, vocab] float32 tensor never exists.
    A padded batch brings its attention_mask; a packed one its position_ids and no mask, so that attention stays
    within each sequence (see data.collate); with `attn_implementation: varlen_attn` both bring their segments.

    temperature: the log-probs of softmax(logits / temperature), the distribution an online method samples from.

    Returns (logps [N] float32, seq_ids [N]: the sequence of each, logits [N, V]).
    """
    keep, targets, target_seqs = logprobs.scored_positions(batch["labels"], batch["seq_ids"])
    logits = model(**forward_inputs(model, batch), use_cache=False, logits_to_keep=keep).logits
    logits = logits if temperature == 1.0 else logits / temperature
    return logprobs.label_logps(logits, targets), target_seqs, logits


def length_multiple(device, model) -> int:
    """What batch lengths are rounded up to. GPUs: 64, so that cuDNN attention, planned per shape, is planned for a
    few shapes instead of at almost every step; varlen_attn plans nothing, so its batches keep their length (no
    extra padding tokens to compute)."""
    return 64 if device.type == "cuda" and model.config._attn_implementation != VARLEN_ATTN else 1


def batch_logps(model, batch, n_seqs):
    """[n_seqs] float32: the summed log-probs of each sequence's labelled tokens (`token_logps`)."""
    logps, seq_ids, _ = token_logps(model, batch)
    return logprobs.sequence_logps(logps, seq_ids, n_seqs)


def forward_inputs(model, batch) -> dict:
    """The model's inputs of a batch (data.collate): ids, and the attention mask (padded) or position ids (packed);
    with `attn_implementation: varlen_attn` the segments instead of a mask."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and model.config._attn_implementation == "eager":  # prefix sharing's
        inputs["attention_mask"] = torch.zeros(mask.shape, device=mask.device).masked_fill(  # mask, additive
            ~mask, torch.finfo(torch.float32).min)
    if model.config._attn_implementation == VARLEN_ATTN:  # segments instead of a mask
        inputs.pop("attention_mask", None)
        inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                      max_length_q=batch["max_seq_len"], max_length_k=batch["max_seq_len"])
        if "segment_prefixes" in batch:  # prefix sharing: the shared keys of each rejected branch
            inputs["segment_prefixes"] = batch["segment_prefixes"]
    return inputs


def head_outputs(model, batch):
    """[rows, tokens] float32: a scalar head's (HEADS sequence_classification) output at every position of a batch.
    Read by a forward hook on the head: the model itself returns its pooled output only (the last non-pad token of
    a row), which would score a packed row's last sequence only, and a reply ending in a pad-like eos at the wrong
    token. Differentiable: the critic trains through it."""
    heads = [m for name, m in model.named_modules() if name.split(".")[-1] == "score"]  # LoRA: peft's wrapper
    if len(heads) != 1:
        raise ValueError(f"expected one 'score' head in {type(model).__name__}, found {len(heads)}")
    seen = []
    handle = heads[0].register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model(**forward_inputs(model, batch), use_cache=False)
    finally:
        handle.remove()
    return seen[0].squeeze(-1).float()


def sequence_scores(model, batch):
    """[n_seqs] float32: a scalar head's score of each sequence at its last token (`head_outputs`), for padded and
    packed rows alike."""
    outputs = head_outputs(model, batch)
    seq_ids = batch["seq_ids"].flatten()
    where = torch.arange(len(seq_ids), device=seq_ids.device)[seq_ids >= 0]
    last = torch.zeros(batch["n_seqs"], dtype=torch.long, device=seq_ids.device).scatter_reduce(
        0, seq_ids[seq_ids >= 0], where, "amax")
    return outputs.reshape(-1)[last]


# ----------------------------------------------------------------------------------------------------------------
# The reference: one interface (logps of a batch, a model to sample from or None, whether it runs in the step),
# four kinds (the disk cache of precomputed reference log-probs: logprobs.py)
# ----------------------------------------------------------------------------------------------------------------
class FrozenReference:
    """A frozen copy of the initial policy, run in every step (and sampled from during evaluation)."""
    runs_forward = True  # its forward is part of each step's FLOPs

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def logps(self, batch, n_seqs):
        """[n_seqs] float32 summed log-probs of the batch's sequences."""
        return batch_logps(self.model, batch, n_seqs)

    @torch.no_grad()
    def token_logps(self, batch, temperature=1.0):
        """[N] float32 log-probs of each labelled token (as models.token_logps), for per-token KL terms."""
        return token_logps(self.model, batch, temperature)[0]

    def fingerprint(self, settings) -> str:
        """Names the disk cache of its log-probs: its weights plus the settings that change log-probs."""
        return weights_digest(self.model, settings)


class PrecomputedReference:
    """Reference log-probs computed once before training (Trainer.precompute_reference_logps) and carried by the
    examples (collate's batch["reference_logps"]); the model itself is freed."""
    runs_forward, model = False, None

    def logps(self, batch, n_seqs):
        return batch["reference_logps"]


class NoReference:
    """The loss needs no reference (SFT, reference_free: true): reference log-probs are None."""
    runs_forward, model = False, None

    def logps(self, batch, n_seqs):
        return None

    def token_logps(self, batch, temperature=1.0):
        return None


def weights_digest(model, extra) -> str:
    """Fingerprint of a model's weights: names, shapes, dtypes and a strided sample of 65536 values per tensor (any
    training run or other checkpoint changes those), plus `extra` (settings that change the log-probs)."""
    return state_digest(model.state_dict(), extra)


def state_digest(state, extra) -> str:
    """weights_digest of a state dict."""
    h = hashlib.sha256(repr(extra).encode())
    for name, tensor in sorted(state.items()):
        if isinstance(tensor, DTensor):  # sharded: gathered (collective, the same order on every process)
            tensor = tensor.full_tensor()
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 65536)].float().cpu()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.numpy().tobytes())
    return h.hexdigest()[:20]
