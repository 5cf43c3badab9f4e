"""FLOP accounting for the MFU metric: the matmul FLOPs of a micro-batch (policy forward + backward, the
reference's forward) from the model's shape and the sequences' real lengths, and the GPU's dense peak."""
import torch

import data
from adapters import LORA_MARK


def model_flop_shape(model):
    """(matmul params outside the vocabulary projection, vocabulary-projection params, layers, hidden size) for
    `model_flops`, and with LoRA a fifth: the adapter's params (then `body` is the frozen base's). The input
    embedding is a lookup (no FLOPs); a tied output head still multiplies. A scalar head (reward_model) has no
    vocabulary projection: it runs at every position, as the body does."""
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings()
    head = output.weight if output is not None else embedding.new_empty(0, device="meta")
    params = dict(model.named_parameters())
    adapter = sum(p.numel() for n, p in params.items() if LORA_MARK in n)
    total = sum(p.numel() for p in params.values())  # a sharded DTensor counts its full size
    body = total - adapter - embedding.numel() - (head.numel() if head is not embedding else 0)
    config = model.config
    shape = body, head.numel(), getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    return (*shape, adapter) if adapter else shape


def model_flops(flop_shape, seqs, with_reference, backward=True) -> tuple[int, float]:
    """(real tokens, matmul FLOPs) of the sequences of a micro-batch ([(input_ids, labels)], data.sequences_of):
    policy forward + backward (3x forward), plus the reference forward when it runs in the step. Forward: 2 x params
    x real tokens (the vocabulary projection only at label positions, as computed) + causal attention 2 x layers x
    hidden x len^2 per sequence. Padding counts for nothing; no device sync (lengths come from the examples).
    With LoRA (a fifth entry, the adapter's params) the frozen base computes no weight gradients: its matmuls cost
    forward + input-gradient = 2x forward, the adapter's and attention's 3x, and the reference (the base, adapter off)
    1x the base's forward. backward=False: the policy's forward alone (no-grad passes, e.g. KTO's KL sequences)."""
    body, head, layers, hidden, *lora = flop_shape
    lengths = [len(ids) for ids, _ in seqs]
    n_labels = sum(data.label_count(labels) for _, labels in seqs)
    base = 2 * body * sum(lengths) + 2 * head * n_labels  # weight matmuls
    attention = 2 * layers * hidden * sum(n * n for n in lengths)
    adapter = 2 * (lora[0] if lora else 0) * sum(lengths)
    policy = (2 if lora else 3) * base + 3 * (attention + adapter) if backward else base + attention + adapter
    return sum(lengths), float(policy + (base + attention if with_reference else 0))


# Dense bf16/fp16 tensor-core peaks (TFLOP/s), from the vendors' datasheets; more specific names first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
               ("GH200", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def peak_flops(device, dtype):
    """The device's peak FLOP/s for the compute dtype, or None where unknown (CPUs, float32, unlisted GPUs): then no
    MFU is logged rather than a made-up one."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)
