"""Sharding (FSDP2) and export: which module class is one FSDP unit, how a model is sharded into units and how its
shards are filled (from rank 0's one read, or from another model's shards), and the tensor names and dtypes a
(sharded or gathered) state dict is exported under, as save_pretrained would write them."""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from utils import UserError


def find_block_class(model, name):
    """The module class sharded as one unit: fsdp.block_class, else the model's own `_no_split_modules` (its
    transformer block), else the class of the first entry of the decoder's layer list."""
    classes = {type(m).__name__: type(m) for m in model.modules()}
    if name is not None:
        if name not in classes:
            raise UserError(f"config: fsdp.block_class={name!r} is not a module class of this model; it has: "
                            f"{', '.join(sorted(classes))}")
        return classes[name]
    for candidate in getattr(model, "_no_split_modules", None) or []:
        if candidate in classes:
            return classes[candidate]
    for attr in ("layers", "h", "blocks"):
        layers = getattr(model.base_model, attr, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return type(layers[0])
    raise UserError(f"config: could not find the transformer block class of {type(model).__name__}: set fsdp.block_class "
                    f"to one of {', '.join(sorted(classes))}")


def shard_model(model, block_class, mesh, mixed, offload, frozen=False):
    """fully_shard every transformer block, an untied input embedding and output head each on its own (a tied pair
    is one parameter: it stays with the root), then the root (the final norm): one all-gather per unit. A unit's
    full weights and gradients exist only while it computes, so the two vocabulary-sized matrices are never full
    together, nor through a whole backward (as one root unit they were: FSDP keeps the root gathered from its
    forward to the end of its backward). frozen (the reference, no backward): the root is also resharded after its
    forward; by default FSDP keeps it gathered for the backward that follows, which never comes."""
    keep_checkpoint_renamings(model)
    units = [m for m in model.modules() if isinstance(m, block_class)]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embedding.weight:
        units += [embedding, head]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mixed, offload_policy=offload, reshard_after_forward=True if frozen else None)
    if mesh.device_type == "cpu" and not frozen:
        for unit in [*units, model]:
            unit.set_custom_reduce_scatter(AllReduceScatter())


class AllReduceScatter:
    """FSDP's gradient reduce-scatter for CPU processes (gloo), through FSDP2's documented hook for it
    (`set_custom_reduce_scatter`): an in-place all-reduce of FSDP's buffer, of which each process keeps its own
    shard. gloo's reduce_scatter works on a copy of its whole input (its peak: 1.5x the input above FSDP's buffer,
    against 0.5x for the all-reduce, 128 MiB measured on 2 processes), and the largest unit's reduce-scatter comes at
    the end of the backward, when every gradient shard already exists: with it this was a training run's memory
    peak. Same op (FSDP divides before and after, as for gloo's own), same sum."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(dist.get_world_size(group), -1)[dist.get_rank(group)])


def keep_checkpoint_renamings(model):
    """transformers finds the renamings that save_pretrained reverts (GPT-NeoX's lm_head, saved as embed_out) by the
    model's class name, which fully_shard changes (FSDPGPTNeoXForCausalLM: none found, the head exported as lm_head).
    So they are looked up before sharding and kept where save_pretrained and checkpoint_names read them: those of a
    model not loaded by from_pretrained (as revert_weight_conversion computes them: no prefix changes)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange
    if isinstance(model, PreTrainedModel) and getattr(model, "_weight_conversions", None) is None:
        model._weight_conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                                     if not isinstance(c, PrefixChange)]


def checkpoint_names(model, state):
    """`state` (the live model's names; full tensors or shards) as save_pretrained writes it: tied weights once,
    names as in the model's published checkpoints (transformers' own reverse conversion, e.g. GPT-NeoX's). None
    where that conversion changes tensors and not only names (MoE experts fused on load), which shards cannot do."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    conversions = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model, add_legacy=False)
    if any(isinstance(c, WeightConverter) for c in conversions):
        return None
    with warnings.catch_warnings():  # transformers reads a DTensor's storage through the deprecated TypedStorage
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def export_state(model, state, dtype):
    """`state` (the model's full state dict, or {} off the main process) in `dtype`, with tied weights sharing one
    tensor again: a converted or gathered dict has a copy per name, and save_pretrained, which drops a tie only
    when both names share storage, would write the tied embedding twice."""
    converted = {k: v.to(dtype) for k, v in state.items()}
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        for name in names[1:]:
            if names[0] in converted and name in converted:
                converted[name] = converted[names[0]]
    return converted


def fill_from_main_process(model, source, device, offload):
    """Fill `model` (built on the meta device, sharded or not) with the weights of `source`, the main process's full
    model (None on the others), broadcast tensor by tensor: each process keeps its shards (set_model_state_dict
    with broadcast_from_rank0), and no other process ever holds a full copy. Non-persistent buffers (rotary
    inv_freq, ...) are in no state dict: they are broadcast from the source's own, as transformers computed them.
    offload (fsdp.cpu_offload, sharded models): the parameter shards live in CPU memory, the buffers (which FSDP
    does not manage) on the compute device, where the forward pass reads them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model.to_empty(device="cpu" if offload else device)
    set_model_state_dict(model, source.state_dict() if source is not None else {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, cpu_offload=offload))
    buffers = dict(source.named_buffers(remove_duplicate=False)) if source is not None else {}
    for prefix, module in model.named_modules():
        for name in sorted(k for k, v in module._buffers.items() if v is not None):  # the same order everywhere
            key, loaded = f"{prefix}.{name}" if prefix else name, module._buffers[name]
            if name not in module._non_persistent_buffers_set:  # in the state dict: loaded above
                module._buffers[name] = loaded.to(device)
                continue
            value = buffers[key].to(device, loaded.dtype) if source is not None else torch.empty_like(loaded, device=device)
            dist.broadcast(value, src=0)
            module._buffers[name] = value


def copy_shards(model, filled, device, offload):
    """Fill `model` (built on the meta device, sharded over the same mesh as `filled`, which is filled already: the
    reference, a deep copy of the policy made before either was filled) with `filled`'s values: each process copies
    its own parameter shards (in `model`'s dtype: a half-precision reference) and the buffers, no communication."""
    sources = dict(filled.named_parameters())
    model.to_empty(device="cpu" if offload else device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = sources[name]
            if not (isinstance(param, DTensor) and isinstance(source, DTensor) and param.placements == source.placements
                    and param.device_mesh == source.device_mesh and param.shape == source.shape):
                raise RuntimeError(f"copy_shards: {name} is not sharded as in the model it would copy")
            param.to_local().copy_(source.to_local())
        buffers = dict(filled.named_buffers(remove_duplicate=False))
        for prefix, module in model.named_modules():
            for name, value in module._buffers.items():
                if value is not None:  # plain tensors (FSDP shards parameters only): on the compute device
                    module._buffers[name] = buffers[f"{prefix}.{name}" if prefix else name].to(device, value.dtype, copy=True)
