"""LoRA (model.lora): a peft adapter on a frozen base, its checkpoint formats and the merged export. The reference of
a LoRA run is the same model with its adapter switched off (models.AdapterOffReference)."""
import contextlib
import os
import warnings

import torch

from utils import UserError

LORA_MARK = "lora_"  # in the names of peft's adapter weights (lora_A, lora_B, ...)
SAVED_MARK = ".modules_to_save."  # peft's trained copy of a module trained whole (a new score head: task SEQ_CLS)


def is_adapter_key(name) -> bool:
    """Whether a LoRA model's parameter or state-dict key is the adapter's (trained and saved with it)."""
    return LORA_MARK in name or SAVED_MARK in name


def lora_linear_names(model) -> list:
    """The distinct last components of the model's nn.Linear module names (q_proj, k_proj, ..., lm_head; and of
    GPT-2's Conv1D, which peft adapts as linear layers)."""
    from transformers.pytorch_utils import Conv1D
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


def apply_lora(model, lora, base_dtype, archive=None, head="causal_lm"):
    """The policy as a peft LoRA model: float32 adapter weights (the only trainable ones) on a frozen base stored in
    `base_dtype` (a torch dtype; autocast computes in policy_dtype anyway). `archive`: an adapter folder whose weights
    the adapter starts from. `head` (models.HEADS): peft's task type, which for a classification head also trains
    the new head itself (its score layer is not in the base)."""
    import peft
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if not isinstance(targets, str):
        known = lora_linear_names(model)
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise UserError(f"config: model.lora.target_modules: {', '.join(map(repr, unknown))} is not a linear layer "
                            f"of this model; its linear layers are: {', '.join(known)}")
        refuse_tied_head_adapter(model, targets)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             task_type=TASK_TYPES[head], bias="none")
    with quiet_peft():
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if is_adapter_key(name) else base_dtype)
    if archive is not None:
        load_adapter_weights(model, archive)
    return model


def refuse_tied_head_adapter(model, targets):
    """An adapter on the output head of a model whose head IS its input embedding (tie_word_embeddings) would adapt
    the head alone: the merged model (head + B A, embedding unchanged) has no tied form, and the export ties them
    again (export_state). ("all-linear" never includes the head: peft leaves the output layer out.)"""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    name = next(n for n, m in model.named_modules() if m is head).rsplit(".", 1)[-1]
    if name in targets:
        raise UserError(f"config: model.lora.target_modules names {name}, but this model ties {name} to its input "
                        f"embedding (tie_word_embeddings: true): an adapter on {name} alone would untie them and the "
                        f"merged model could not be exported with tied weights; leave {name} out of target_modules")


def load_adapter_weights(model, folder):
    """An adapter folder's weights (adapter_model.safetensors) into the model's adapter, every key and shape matching."""
    import peft
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"config: model.archive: {folder} has adapter_config.json but no adapter_model.safetensors")
    try:
        result = peft.set_peft_model_state_dict(model, load_file(path))
        missing = [k for k in result.missing_keys if is_adapter_key(k)]
    except RuntimeError as e:  # a shape that differs: another r
        missing, result = [" ".join(str(e).split())[:200]], None
    if missing or result.unexpected_keys:
        raise UserError(f"config: model.archive: the adapter in {folder} does not fit model.lora (another r or other "
                        f"target_modules?): {', '.join((missing or result.unexpected_keys)[:3])}")


def merge_adapter_folder(model, folder):
    """model.archive is an adapter folder and model.lora is null: the base with that adapter merged into it."""
    import peft
    with quiet_peft():
        return peft.PeftModel.from_pretrained(model, folder).merge_and_unload().requires_grad_(True)


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per model, not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        yield


def is_adapter_folder(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_state(model) -> dict:
    """The adapter's (float32, trainable) weights under the live model's names: what a LoRA checkpoint resumes."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def base_state(state) -> dict:
    """A LoRA model's state dict -> its frozen base weights under the names the plain model gives them (peft's
    `base_model.model.` prefix, `.base_layer` and `.original_module` dropped, adapter weights left out)."""
    prefix = "base_model.model."
    return {k[len(prefix):].replace(".base_layer.", ".").replace(".original_module.", "."): v
            for k, v in state.items() if not is_adapter_key(k)}


@torch.no_grad()
def merged_state(model, state) -> dict:
    """The weights of LoRA model `model` with its adapter merged (W + B A alpha / r, in float32), under the plain
    model's names, from `state`: the model's full state dict (`layout.full_state_dict`: gathered under FSDP; {} off
    the main process gives {}). Computed aside, so the training policy is left exactly as it was."""
    from peft.tuners.lora import LoraLayer
    if not state:
        return {}
    merged = {k: v.float() for k, v in base_state(state).items()}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    a, b = (state[f"base_model.model.{name}.lora_{x}.{adapter}.weight"].float() for x in "AB")
                    delta = b @ a * module.scaling[adapter]
                    delta = delta.T if module.fan_in_fan_out else delta  # GPT-2's Conv1D stores [in, out]
                    merged[f"{name}.weight"] = merged[f"{name}.weight"] + delta  # a new tensor: the policy's stays
    for key, value in state.items():  # a module trained whole (the score head): its trained copy
        if SAVED_MARK in key:
            module, rest = key[len("base_model.model."):].split(SAVED_MARK, 1)
            merged[f"{module}.{rest.split('.', 1)[1]}"] = value.float()
    return merged
