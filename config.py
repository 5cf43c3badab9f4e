"""The config: its schema (every key, its type, default, allowed range and, in the comment beside it, what it means),
loading (YAML file + `key=value` overrides) and validation with one-line errors (`utils.UserError`).

The schema below is the single source of truth for every config key. `example/full-config.yml` repeats it as a
commented YAML file; a test keeps the two equal. Loading needs no torch until the last checks (train.py checks the
config before torch and transformers are imported, so a mistake is reported in well under a second).
"""
import dataclasses
import difflib
import math
import netrc
import operator
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils import UserError

# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------
TRAINERS = ("BasicTrainer", "FSDPTrainer")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # models.DTYPES maps them to torch dtypes
SCHEDULES = ("constant", "linear", "cosine")       # what follows the linear warmup
DATASET_TYPES = ("custom_dataset", "huggingface_dataset")
HF_DATASET_NAMES = ("hh", "shp", "se")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention", "varlen_attn")  # + transformers' registry
RANGE_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def num(default, **bounds):
    """A numeric schema field with its allowed range beside it, e.g. num(0.1, gt=0) or num(0.0, ge=0, lt=0.5);
    `_check_ranges` checks every such field (a null passes where the type is Optional), and a test makes sure no
    numeric field of the schema goes without one."""
    assert bounds and set(bounds) <= set(RANGE_OPS), bounds
    return field(default=default, metadata={"range": bounds})


@dataclass
class DatasetConfig:
    type: str = "custom_dataset"            # custom_dataset (a local .json/.jsonl/.parquet or a hub id) | huggingface_dataset (hh, shp, se)
    path: Optional[str] = None              # file, folder or hub id; for huggingface_dataset an optional local copy of the raw data
    name: Optional[str] = None              # huggingface_dataset only: hh | shp | se
    split: str = "train"                    # split to read from hub datasets and folders


@dataclass
class LoraConfig:  # model.lora: train a low-rank adapter on a frozen base instead of every weight
    r: int = num(8, ge=1)                   # rank of each adapter (A: r x in, B: out x r)
    alpha: float = num(16, gt=0)            # scaling: the adapter's update is multiplied by alpha / r
    dropout: float = num(0.0, ge=0, lt=1)   # dropout on the adapter's input; > 0 makes policy log-probs noisy
    target_modules: Any = "all-linear"      # all-linear (every nn.Linear but the output head) or a list of names, e.g. [q_proj, v_proj]


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None      # hub id or local folder of the policy; null builds one from `from_config`
    tokenizer_name_or_path: Optional[str] = None  # defaults to name_or_path
    from_config: Optional[Dict[str, Any]] = None  # random init from an architecture, e.g. {model_type: llama, hidden_size: 64, ...}
    archive: Optional[str] = None           # initial weights for policy and reference: an HF folder or a .pt state dict
    policy_dtype: str = "float32"           # float32 | bfloat16 | float16: autocast compute dtype; master weights stay float32
    reference_dtype: Optional[str] = None   # null = exactly the policy (float32 weights, same autocast): step-0 rewards are 0; bfloat16/float16: a half-precision copy (half the memory, rewards carry rounding noise)
    fsdp_policy_mp: Optional[str] = None    # FSDPTrainer mixed-precision param dtype (null = policy_dtype)
    trust_remote_code: bool = False         # allow model code from the hub (off: never runs downloaded code)
    attn_implementation: Optional[str] = None  # e.g. sdpa | eager | flash_attention_2 | varlen_attn (packing); null = varlen_attn for packing on a CPU, else transformers' default
    lora: Optional[LoraConfig] = None       # null = full fine-tuning; {} or {r: 16, ...} = LoRA (keys below; docs/lora.md)


# loss.name's choices, here for the check before torch is imported; the loss table (losses.LOSSES, which needs torch)
# is what each one does, and a test keeps the two equal
LOSS_NAMES = ("sft", "dft", "dpo", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
              "discopop", "bco_pair", "simpo", "cpo", "orpo", "kto", "reward_model", "grpo", "dr_grpo", "dapo",
              "gspo", "rloo", "reinforce_pp", "ppo")


@dataclass
class LossConfig:  # null = the loss's own default (losses.LOSSES); a key the chosen loss does not use is ignored (a warning)
    name: str = "dpo"                       # sft | dft | dpo | robust | ipo | hinge | exo_pair | nca_pair | sppo_hard | apo_zero | apo_down | discopop | bco_pair | simpo | cpo | orpo | kto | reward_model | online: grpo | dr_grpo | dapo | gspo | rloo | reinforce_pp | ppo
    beta: Optional[float] = num(None, ge=0)  # temperature: strength of the pull towards the reference (0.1; simpo 2.0; orpo: its lambda); online: the KL coefficient (0 builds no reference; rloo, reinforce_pp 0.05)
    label_smoothing: Optional[float] = num(None, ge=0, lt=1)  # dpo/cpo/simpo: cDPO's flipped-label probability, < 0.5 (0); robust: noise rate, < 0.5 (0.1); exo_pair: eps, > 0 (1e-3)
    simpo_gamma: Optional[float] = num(None, ge=0)  # simpo: target reward margin gamma (1.0, i.e. gamma/beta = 0.5)
    discopop_tau: Optional[float] = num(None, gt=0)  # discopop: temperature of its log-ratio modulation (0.05)
    desirable_weight: Optional[float] = num(None, gt=0)  # kto: weight of desirable examples (1.0)
    undesirable_weight: Optional[float] = num(None, gt=0)  # kto: weight of undesirable examples (1.0)
    nll_weight: Optional[float] = num(None, ge=0)  # any pair loss: + this x NLL of the chosen responses (RPO; 0; cpo, orpo: 1.0)
    length_normalize: Optional[bool] = None  # any pair loss: length-averaged instead of summed log-probs (false; simpo, orpo always)
    reference_free: bool = False            # any reference-based pair loss without a reference model (reference log-probs taken as 0)
    online: Optional[bool] = None           # pair losses: sample each step's pairs from prompts (best and worst of rollout.num_generations completions by the rewards; TRL's OnlineDPO) (false)
    center_rewards_coefficient: Optional[float] = num(None, ge=0)  # reward_model: weight of (r_c + r_r)^2, keeping scores near 0 (0.0; Eisenstein et al. use 0.01)
    epsilon: Optional[float] = num(None, gt=0, lt=1)  # online: clip range below 1 (and above, unless epsilon_high is set) (0.2; gspo 3e-4)
    epsilon_high: Optional[float] = num(None, gt=0)  # online: clip range above 1 (epsilon; dapo's clip-higher 0.28; gspo 4e-4)
    gamma: Optional[float] = num(None, ge=0, le=1)  # ppo: discount of GAE (1.0)
    lam: Optional[float] = num(None, ge=0, le=1)  # ppo: lambda of GAE, bias (0) to variance (1) (0.95)
    cliprange_value: Optional[float] = num(None, gt=0)  # ppo: how far a value may move from the rollout's in one update (0.2)
    vf_coef: Optional[float] = num(None, gt=0)  # ppo: weight of the critic's value loss (0.1)
    kl_target: Optional[float] = num(None, gt=0)  # ppo: adapt beta towards this KL per sequence (Ziegler et al.); null = beta fixed (null)
    kl_horizon: Optional[int] = num(None, ge=1)  # ppo: sequences over which the adaptive beta moves by at most 20% (10000)


@dataclass
class RolloutConfig:  # online methods: how completions of the prompts are sampled and used
    num_generations: int = num(8, ge=1)     # completions per prompt (the group); group methods need >= 2
    max_new_tokens: int = num(256, ge=1)    # length limit of a completion
    temperature: float = num(1.0, ge=0)     # sampling temperature (0 = greedy, no exploration)
    top_p: float = num(1.0, gt=0, le=1)     # nucleus sampling
    num_iterations: int = num(1, ge=1)      # optimizer passes over each rollout (>1: off-policy, the ratio and clip matter)
    mask_truncated: bool = False            # completions cut by max_new_tokens get no loss
    dynamic_sampling: bool = False          # DAPO: drop groups whose rewards are all equal and sample more prompts to fill the batch
    max_sampling_rounds: int = num(4, ge=1)  # dynamic_sampling: rollouts at most per step before training on what it has
    generation_batch_size: Optional[int] = num(None, ge=1)  # sequences per generate call; null: all of a process's completions at once (as TRL)


@dataclass
class RewardConfig:  # one entry of `rewards:`; the rewards are summed with their weights, each is logged on its own
    function: Optional[str] = None          # math | format | overlong (built-ins) | path/to/file.py:name | module:name
    model: Optional[str] = None             # instead of a function: a reward model (loss.name=reward_model's final/, or a hub id) scoring prompt + completion
    weight: float = num(1.0, ge=-1e6, le=1e6)  # its weight in the sum
    pattern: Optional[str] = None           # format: the regex the whole completion must match (null: <think>.*?</think>.*)
    max_length: Optional[int] = num(None, ge=1)  # overlong: completions longer than this get -1
    buffer: Optional[int] = num(None, ge=1)  # overlong: the last `buffer` tokens before max_length are penalised linearly


@dataclass
class CriticConfig:  # ppo: the value model, trained beside the policy with its own optimizer
    name_or_path: Optional[str] = None      # a scalar-head model (e.g. the reward model's final/) or a causal LM; null = the policy's initial weights, new zero head
    lr: Optional[float] = num(None, gt=0)   # its peak learning rate (same schedule and optimizer as the policy); null = lr


@dataclass
class WandbConfig:
    enabled: bool = False                   # log to Weights & Biases (WANDB_MODE=offline works without network)
    entity: Optional[str] = None            # WandB team or user; null = your default entity
    project: str = "Minimal-LLM-Alignment"  # WandB project
    name: Optional[str] = None              # run name; null = exp_name


@dataclass
class FSDPConfig:
    world_size: int = num(2, ge=1)          # plain `python train.py` on a machine with no GPU: CPU worker processes (gloo)
    block_class: Optional[str] = None       # module class sharded as one unit, e.g. LlamaDecoderLayer; null = detect from the model
    cpu_offload: bool = False               # keep sharded params, grads and optimizer state in CPU memory (CUDA only; slower)
    shard_reference: bool = True            # shard the DPO reference (and a reward model) like the policy (less memory) or replicate them (less traffic)
    timeout_minutes: int = num(30, ge=1)    # a collective that waits longer (dead rank or node) fails and stops every rank
    async_checkpoint: bool = False          # write step checkpoints' sharded state (dcp/) in the background while training goes on
    replicate: int = num(1, ge=1)           # HSDP: replicas (the number of nodes) x shards = world size; 1 = plain FSDP


@dataclass
class Config:
    seed: int = num(0, ge=0, lt=2**32)      # seeds python, numpy, torch, the data shuffle and the held-out split
    exp_name: str = "my_experiment"         # run name; used in output_dirs and as the WandB run name
    debug: bool = False                     # quick look: no WandB, no checkpoints
    datasets: List[DatasetConfig] = field(default_factory=list)       # training data (one or more, concatenated)
    eval_datasets: List[DatasetConfig] = field(default_factory=list)  # held-out data; empty = hold out n_eval_examples from datasets
    trainer: str = "BasicTrainer"           # BasicTrainer (one device) | FSDPTrainer (sharded, many devices)
    device: Optional[str] = None            # cuda | cpu | cuda:1 ...; null = cuda when available, else cpu
    optimizer: str = "AdamW"                # any torch.optim class name: AdamW, Adam, RMSprop, SGD, ...
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra optimizer arguments, e.g. {betas: [0.9, 0.95]}; Adam/AdamW: fused kernel unless {fused: false}
    lr: float = num(5e-7, gt=0)             # peak learning rate
    weight_decay: float = num(0.0, ge=0)    # decoupled weight decay (AdamW) / L2 (others)
    lr_scheduler: str = "constant"          # after warmup: constant | linear (decay to 0) | cosine (decay to 0)
    warmup_steps: int = num(150, ge=0)      # optimizer steps of linear warmup from 0 to lr
    total_batch_size: int = num(64, ge=1)   # examples (DPO: preference pairs) per optimizer step; alias: batch_size
    eval_batch_size: int = num(16, ge=1)    # examples per forward pass during evaluation
    gradient_accumulation_steps: int = num(1, ge=1)  # micro-batches per optimizer step (must divide total_batch_size)
    max_grad_norm: float = num(10.0, ge=0)  # gradient clipping by global norm (0 = off)
    max_length: int = num(512, ge=2)        # max tokens of prompt + response; longer examples are truncated
    max_prompt_length: Optional[int] = num(None, ge=1)  # max prompt tokens (prompts keep their end); null = half of max_length
    n_epochs: Optional[int] = num(1, ge=1)  # passes over the training data (null: use n_examples)
    n_examples: Optional[int] = num(None, ge=1)  # stop after this many training examples (null: use n_epochs)
    n_eval_examples: int = num(256, ge=0)   # held-out examples for evaluation (0 = no evaluation, nothing held out)
    do_first_eval: bool = True              # evaluate before the first step
    eval_only: bool = False                 # no training: evaluate the model (or the checkpoint resume= names) once, write eval.json in the run folder
    eval_every_steps: int = num(100, ge=1)  # evaluate every N optimizer steps (and at the end)
    sample_during_eval: bool = False        # generate completions from eval prompts at every evaluation
    n_eval_model_samples: int = num(4, ge=1)  # how many prompts to sample completions for
    max_new_tokens: int = num(64, ge=1)     # length limit of those completions
    eval_num_generations: int = num(1, ge=1)  # online methods: completions per eval prompt (k of pass@k; 1: greedy pass@1 only)
    sample_temperature: float = num(1.0, ge=0)  # sampling temperature of the eval samples; 0 = greedy decoding
    sample_top_p: float = num(0.95, gt=0, le=1)  # nucleus sampling of the eval samples
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    packing: bool = False                   # padding-free batches: sequences laid end to end in rows of max_length tokens
    prefix_sharing: Optional[bool] = None   # preference pairs: the prompt computed once for chosen and rejected; null = on where never slower (varlen_attn on a CPU)
    group_by_length: bool = False           # batch examples of similar length together (less padding); order stays random
    precompute_reference_logps: bool = False  # DPO/IPO: reference log-probs computed once (and cached), then the reference is freed
    reference_cache_dir: Optional[str] = None  # where those are cached; null = $XDG_CACHE_HOME/minimal-llm-alignment/reference_logps
    compile: bool = False                   # torch.compile the model(s): faster steps after a one-off compile time
    print_log_step: int = num(10, ge=1)     # write train metrics every N optimizer steps
    save_model_step: Optional[int] = num(None, ge=1)  # also save a checkpoint every N optimizer steps (null: only at the end)
    save_optimizer: bool = True             # save optimizer, scheduler and RNG state in each checkpoint (needed to resume)
    save_total_limit: Optional[int] = num(None, ge=1)  # keep only the newest K step-N checkpoints (final is always kept); null = all
    resume: Optional[str] = None            # null | auto (newest complete checkpoint in the run folder, else start fresh) | a checkpoint folder
    overwrite: bool = False                 # start afresh in a run folder that already holds a run (its files are removed)
    resume_allow_changes: bool = False      # resume although keys that change the maths differ from the run's config (the old one is kept as config.before-step-N.yaml)
    max_nonfinite_steps: int = num(5, ge=1)  # a step with a non-finite loss/gradient is skipped; stop after this many in a row
    output_dirs: str = "./outputs/${exp_name}"  # the run folder: config, metrics, curves, samples, checkpoints
    report_to_tensorboard: bool = True      # write TensorBoard event files to <run folder>/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: List[RewardConfig] = field(default_factory=list)  # online methods: what scores a completion (see RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


ALIASES = {"batch_size": "total_batch_size"}   # the original project's config files use both names
# The names other trainers (transformers' TrainingArguments, TRL, torchtune) give our keys: an unknown key that is one
# of them is answered with ours, not with the closest spelling (learning_rate is not print_log_step).
USUAL_NAMES = {
    "learning_rate": "lr", "epochs": "n_epochs", "num_train_epochs": "n_epochs", "num_epochs": "n_epochs",
    "per_device_train_batch_size": "total_batch_size", "train_batch_size": "total_batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "max_seq_length": "max_length", "max_seq_len": "max_length",
    "model_name_or_path": "model.name_or_path", "model_name": "model.name_or_path",
    "tokenizer_name_or_path": "model.tokenizer_name_or_path", "output_dir": "output_dirs",
    "logging_steps": "print_log_step", "eval_steps": "eval_every_steps", "save_steps": "save_model_step",
    "gradient_checkpointing": "activation_checkpointing", "lr_scheduler_type": "lr_scheduler",
    "warmup_ratio": "warmup_steps", "max_prompt_len": "max_prompt_length", "beta": "loss.beta",
    "loss_type": "loss.name", "bf16": "model.policy_dtype", "fp16": "model.policy_dtype",
    "torch_dtype": "model.policy_dtype", "dtype": "model.policy_dtype", "gradient_accumulation": "gradient_accumulation_steps",
    "max_steps": "n_examples", "dataset": "datasets", "dataset_name": "datasets", "train_file": "datasets",
    "resume_from_checkpoint": "resume", "report_to": "wandb.enabled", "run_name": "exp_name", "use_peft": "model.lora",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout",
}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def did_you_mean(word, options) -> str:
    options = [str(o) for o in options]
    lowered = {o.lower(): o for o in options}
    match = lowered.get(str(word).lower()) or next(iter(difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)), None)
    return f" (did you mean '{match}'?)" if match else ""


def _check_keys(user, schema_cls, prefix=""):
    """Unknown keys, with the full dotted name and a did-you-mean, before OmegaConf gives a less helpful message."""
    fields = {f.name: f for f in dataclasses.fields(schema_cls)}
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in fields:
            usual = USUAL_NAMES.get(str(key).lower()) if not prefix else None  # another trainer's name for ours
            hint = f" (did you mean '{usual}'?)" if usual else did_you_mean(key, fields)
            raise UserError(f"config: unknown key '{name}'{hint}")
        sub = _nested_schema(fields[key].type)
        if sub is None:
            continue
        if isinstance(value, (dict, DictConfig)):
            _check_keys(value, sub, name + ".")
        elif isinstance(value, (list, ListConfig)):
            for i, item in enumerate(value):
                if not isinstance(item, (dict, DictConfig)):
                    raise UserError(f"config: '{name}[{i}]' must be a mapping like {{type: custom_dataset, path: ...}}")
                _check_keys(item, sub, f"{name}[{i}].")


def _nested_schema(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in getattr(tp, "__args__", ()):   # List[DatasetConfig]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def choices(word, allowed, limit=32) -> str:
    """'a, b, c' and a did-you-mean for `word`, for one-line errors; a longer list shows the `limit` names closest to
    `word` and how many more there are."""
    allowed = [str(a) for a in allowed]
    shown = allowed if len(allowed) <= limit else difflib.get_close_matches(str(word), allowed, n=limit, cutoff=0)
    more = f", ... {len(allowed) - len(shown)} more" if len(allowed) > len(shown) else ""
    return ", ".join(shown) + more + did_you_mean(word, allowed)


def _check_choice(key, value, allowed):
    if value not in allowed:
        raise UserError(f"config: {key}={value!r} is not one of {choices(value, allowed)}")


def _check_ranges(node, schema_cls, prefix=""):
    """Every numeric field against the range declared beside it in the schema (`num`), nested configs included."""
    for f in dataclasses.fields(schema_cls):
        value, name, sub = node[f.name], prefix + f.name, _nested_schema(f.type)
        if sub is not None and value is not None:
            for i, item in enumerate(value) if isinstance(value, ListConfig) else [(None, value)]:
                _check_ranges(item, sub, f"{name}[{i}]." if i is not None else f"{name}.")
        bounds = f.metadata.get("range")
        if bounds and value is not None and not in_range(value, bounds):
            null = " (or null)" if type(None) in getattr(f.type, "__args__", ()) else ""
            raise UserError(f"config: {name} must be {range_text(value, bounds)}{null}, got {value}")


def in_range(value, bounds) -> bool:
    """value within `bounds` ({op: bound}, as `num` declares them), and finite."""
    return math.isfinite(value) and all(RANGE_OPS[op][1](value, b) for op, b in bounds.items())


def range_text(value, bounds) -> str:
    """">= 0 and < 0.5": what `bounds` allow, for the message that refuses `value`."""
    return ("" if math.isfinite(value) else "finite and ") + " and ".join(f"{RANGE_OPS[op][0]} {b}"
                                                                          for op, b in bounds.items())


def _validate(cfg, notes, light=False):
    """Choices, ranges and the checks across keys; what needs torch or transformers comes last, and only if needed
    (light=True: stop before it)."""
    _check_choice("trainer", cfg.trainer, TRAINERS)
    _check_choice("lr_scheduler", cfg.lr_scheduler, SCHEDULES)
    for key in ("policy_dtype", "reference_dtype", "fsdp_policy_mp"):
        if key == "policy_dtype" or cfg.model[key] is not None:
            _check_choice(f"model.{key}", cfg.model[key], DTYPE_NAMES)
    _check_sources(cfg)
    _check_ranges(cfg, Config)
    check_batch_split(cfg, 1)  # again for the number of processes, once it is known
    if cfg.n_epochs is None and cfg.n_examples is None:
        raise UserError("config: set n_epochs or n_examples (both are null)")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise UserError(f"config: max_prompt_length ({cfg.max_prompt_length}) must be < max_length ({cfg.max_length}); "
                        "leave it null for half of max_length")
    _check_wandb_login(cfg)
    _check_choice("loss.name", cfg.loss.name, LOSS_NAMES)
    if cfg.prefix_sharing and cfg.model.attn_implementation not in (None, "sdpa", "eager", "varlen_attn"):
        raise UserError(f"config: prefix_sharing=true needs an attention that takes a mask or shared keys: "
                        f"model.attn_implementation sdpa, eager or varlen_attn (or null), got "
                        f"{cfg.model.attn_implementation}")
    _check_fsdp(cfg, cuda_available=None)  # where the number of processes is known without torch
    if light:
        return
    if cfg.model.attn_implementation is not None and cfg.model.attn_implementation not in ATTN_IMPLEMENTATIONS:
        from transformers import AttentionInterface  # the registry, only for a value outside the usual ones
        allowed = list(dict.fromkeys([*ATTN_IMPLEMENTATIONS, *AttentionInterface().valid_keys()]))
        _check_choice("model.attn_implementation", cfg.model.attn_implementation, allowed)
    _check_lora(cfg)
    _check_loss(cfg.loss, notes)
    import online  # the online methods' own checks (rewards that load, groups): they import torch
    online.check_config(cfg)
    import torch  # last: a config with a mistake elsewhere fails before torch is imported
    optimizers = [n for n, c in vars(torch.optim).items()
                  if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]
    _check_choice("optimizer", cfg.optimizer, sorted(optimizers))
    _check_fsdp(cfg, torch.cuda.is_available())


def _check_sources(cfg):
    """Where the data and the model come from: at least one dataset, each of a known type with what that type needs;
    a model folder / hub id, or an architecture to build (with a tokenizer)."""
    if not cfg.datasets:
        raise UserError("config: 'datasets' is empty: add at least one, e.g. datasets: [{type: custom_dataset, path: data.json}]")
    for group in ("datasets", "eval_datasets"):
        for i, spec in enumerate(cfg[group]):
            _check_choice(f"{group}[{i}].type", spec.type, DATASET_TYPES)
            if spec.type == "huggingface_dataset":
                _check_choice(f"{group}[{i}].name", spec.name, HF_DATASET_NAMES)
            elif not spec.path:
                raise UserError(f"config: {group}[{i}].path is required for type custom_dataset")
    if cfg.model.name_or_path is None and cfg.model.from_config is None:
        raise UserError("config: set model.name_or_path (hub id or local folder) or model.from_config (random init)")
    if cfg.model.name_or_path is None and cfg.model.tokenizer_name_or_path is None:
        raise UserError("config: model.from_config needs model.tokenizer_name_or_path")


def _check_lora(cfg):
    """What LoRA does not combine with; its module names are checked against the model (adapters.apply_lora)."""
    lora = cfg.model.lora
    if lora is None:
        return
    if cfg.model.reference_dtype not in (None, "float32"):
        raise UserError(f"config: model.reference_dtype={cfg.model.reference_dtype} does not apply with model.lora: the "
                        "reference is the frozen base itself (its weights are stored in policy_dtype); leave it null")
    names = lora.target_modules
    if not (names == "all-linear" or isinstance(names, ListConfig) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"config: model.lora.target_modules must be all-linear or a list of module names such as "
                        f"[q_proj, v_proj], got {names!r}")


def _check_loss(loss_cfg, notes):
    """loss.name and its loss.* keys, as the loss table (losses.LOSSES) declares them: a null hyper-parameter takes
    the loss's own default (written into the config, so the saved config says what ran) and is checked against the
    loss's own range where it has one. A key the loss does not use (the seed's `beta: 0.1` left in the file with
    `name: sft`) is set to null, so the saved config does not claim it ran, with a note unless it was null or its
    neutral value (losses.NEUTRAL); an explicit value outside what the loss's paper uses is noted too."""
    import losses  # imports torch: after every check that does not need it (loss.name was checked before)
    import rl_losses
    spec, uses = losses.LOSSES[loss_cfg.name], losses.parameters_of(loss_cfg.name)
    explicit = {k: loss_cfg[k] for k in uses}
    for f in dataclasses.fields(LossConfig):
        value = loss_cfg[f.name]
        if f.name == "name" or value is None and f.name not in uses:
            continue
        if f.name not in uses:
            if value != losses.NEUTRAL.get(f.name, object()):
                notes.append(f"warning: loss.{f.name}={value} is not used by loss.name={loss_cfg.name} and is ignored "
                             f"(it takes {', '.join(f'loss.{k}' for k in uses) or 'no loss.* keys'})")
            loss_cfg[f.name] = None if f.name != "reference_free" else False
            continue
        bounds = spec.ranges.get(f.name)  # narrower for this loss than the schema's
        if value is not None and bounds and not in_range(value, bounds):
            raise UserError(f"config: loss.{f.name} must be {range_text(value, bounds)} for "
                            f"loss.name={loss_cfg.name}, got {value}")
        low, high = spec.usual.get(f.name, (-math.inf, math.inf))
        if value is not None and not low <= value <= high:
            notes.append(f"warning: loss.{f.name}={value} is far from what {loss_cfg.name}'s paper uses ({low:g} to "
                         f"{high:g}; its default is {uses[f.name]}): leave it null for the default")
        loss_cfg[f.name] = uses[f.name] if value is None else value
    if spec.online is not None:  # an explicit epsilon is the clip range on both sides unless epsilon_high is set
        loss_cfg.update(rl_losses.resolve(spec.online, *(explicit[k] for k in ("beta", "epsilon", "epsilon_high"))))

def check_batch_split(cfg, world_size):
    """The one rule: a global batch splits evenly into micro-batches x processes."""
    per_step = cfg.gradient_accumulation_steps * world_size
    if cfg.total_batch_size % per_step:
        raise UserError(f"config: total_batch_size={cfg.total_batch_size} is not divisible by "
                        f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} x world size {world_size} "
                        f"({cfg.gradient_accumulation_steps} x {world_size} = {per_step})")


def check_replicate(cfg, world_size):
    """fsdp.replicate (HSDP) splits the world into replicas x shards: it must divide the number of processes."""
    replicate = cfg.fsdp.replicate
    if replicate > world_size or world_size % replicate:
        how = "is larger than" if replicate > world_size else "does not divide"
        raise UserError(f"config: fsdp.replicate={replicate} {how} the world size {world_size} (replicas x shards = "
                        f"processes; set it to the number of nodes, or 1 for plain FSDP)")


def _check_fsdp(cfg, cuda_available):
    """The batch split and fsdp.replicate against the world size where the config alone tells it: WORLD_SIZE under
    torchrun (and in the own launcher's workers), fsdp.world_size for the own launcher's CPU workers (before any is
    started). The own launcher on GPUs starts one worker per GPU: each checks it there (layouts.FSDPRanks).
    cuda_available None: not known yet (torch not imported); a machine without an NVIDIA driver has no CUDA."""
    if cfg.trainer != "FSDPTrainer":
        return
    if cuda_available is None:  # before torch: only a machine without an NVIDIA driver surely has no CUDA
        cuda_available = None if os.path.exists("/proc/driver/nvidia") else False
    device = cfg.device or (None if cuda_available is None else "cuda" if cuda_available else "cpu")  # as models.device_type
    if "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    elif device is not None and device.split(":")[0] == "cpu":
        world_size = cfg.fsdp.world_size
    else:
        return
    check_batch_split(cfg, world_size)
    check_replicate(cfg, world_size)


def _check_wandb_login(cfg):
    """wandb.enabled with no credentials would stop at wandb's login prompt (or wait forever without a terminal)."""
    if not cfg.wandb.enabled or cfg.debug or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") \
            or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError(f"config: wandb.enabled=true but no WandB login was found (no WANDB_API_KEY, no {host} entry in "
                    f"{path}): run `wandb login` or set WANDB_API_KEY, or log offline with WANDB_MODE=offline")


def _rename_aliases(user):
    for alias, key in ALIASES.items():
        if alias in user:
            if key in user and user[key] != user[alias]:
                raise UserError(f"config: both '{alias}' and '{key}' are set ('{alias}' is an alias of '{key}'); keep one")
            user[key] = user.pop(alias)


def _check_relative_paths(cfg, config_path):
    """Paths in a config are relative to the folder the command runs from. A copied YAML's `path: data/x.json` that
    is missing there but exists beside the config file is a one-line error that says both places (instead of a hub
    lookup of 'data/x.json' failing with "no network?" later)."""
    here = os.path.dirname(os.path.abspath(config_path))
    keys = {"model.name_or_path": cfg.model.name_or_path, "model.tokenizer_name_or_path": cfg.model.tokenizer_name_or_path,
            "model.archive": cfg.model.archive,
            **{f"{group}[{i}].path": spec.path for group in ("datasets", "eval_datasets") for i, spec in enumerate(cfg[group])}}
    for key, value in keys.items():
        if not value or os.path.isabs(os.path.expanduser(value)) or os.path.exists(value):
            continue
        beside = os.path.join(here, value)
        if os.path.exists(beside):
            raise UserError(f"config: {key}: '{value}' is not in the folder you run from ({os.getcwd()}), but it is "
                            f"beside the config file: use {os.path.relpath(beside)} (paths are relative to the folder "
                            "you run from)")


def load_config(path, overrides=(), notes=None, light=False) -> DictConfig:
    """YAML file merged over the schema defaults, then `key=value` overrides (dotted keys, YAML values), resolved.
    `notes`: a list that receives the warnings about the config (keys that are ignored, unusual values), for the
    caller to print once. light=True: only the checks that need no torch (train.py's first, fast check)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        user = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: keep the line/column part of the message
        raise UserError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(user, DictConfig):
        raise UserError(f"{path}: the config must be a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--overrides: '{item}' is not of the form key=value")
    try:
        layers = [OmegaConf.to_container(user), OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))]
    except OmegaConfBaseException as e:
        raise UserError(f"--overrides: {' '.join(str(e).splitlines()[0].split())}") from e
    for layer in layers:  # per layer, so that `--overrides batch_size=32` beats `total_batch_size: 16` in the file
        _rename_aliases(layer)
    user = OmegaConf.to_container(OmegaConf.merge(*layers))
    _check_keys(user, Config)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), user)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"config: {key + ': ' if key else ''}{msg}") from e
    _check_relative_paths(cfg, path)
    _validate(cfg, [] if notes is None else notes, light)
    if cfg.max_prompt_length is None:  # the default: half of max_length, so every later reader sees an int
        cfg.max_prompt_length = cfg.max_length // 2
    return cfg


def flat_keys(tree, prefix="") -> dict:
    """{'loss.name': 'dpo', ...}: the leaves of a nested config (a plain dict, e.g. OmegaConf.to_container's) under
    their dotted keys; lists (datasets) stay whole values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flat_keys(value, f"{prefix}{key}.").items()}


def config_yaml(cfg) -> str:
    """The resolved config as YAML: what is saved beside every checkpoint."""
    return OmegaConf.to_yaml(cfg, resolve=True)
