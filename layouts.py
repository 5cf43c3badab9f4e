"""Process layouts: where the processes are and how they talk. A layout exists before any model is built (train.py
makes it from `trainer:`, models.build_models places the weights by it, the Trainer reduces, clips and saves
through it): `OneDevice` (trainer: BasicTrainer) or `FSDPRanks` (trainer: FSDPTrainer: FSDP2 over every process of
a device mesh, 1-D or 2-D with fsdp.replicate; GPUs, nodes, or CPU workers with gloo).
"""
import ctypes
import os
import shutil
from concurrent.futures import Future
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import adapters
import models
import sharding
from config import check_batch_split, check_replicate
from utils import UserError


class OneDevice:
    """One process on one device (trainer: BasicTrainer)."""
    rank, world_size, mesh = 0, 1, None

    def __init__(self, cfg):
        self.device = models.pick_device(cfg)

    def local_share(self, examples):
        """This process's part of a global batch: all of it."""
        return examples

    def reduce_sums(self, sums: dict) -> dict:
        """Metric sums over all processes."""
        return sums

    def any_process(self, flag: bool) -> bool:
        """True when the flag is set on any process (a signal may reach the ranks at different steps)."""
        return flag

    def all_gather(self, tensor):
        """[world_size, *tensor.shape]: every process's tensor (the same shape on each)."""
        return tensor[None]

    def clip_gradients(self, model, max_norm) -> float:
        """Clip the global gradient norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def full_state_dict(self, model, frozen=True):
        """The model's complete weights, on the main process (frozen=False: its trainable ones, a LoRA adapter)."""
        state = model.state_dict()
        return state if frozen else {k: v for k, v in state.items() if adapters.is_adapter_key(k)}

    def save_sharded(self, model, optimizer, path, background=False):
        """Each process's shard of model and optimizer state (FSDPRanks); one device keeps them in training_state.pt.
        Returns what FSDPRanks returns, a future: here None, nothing to wait for."""

    def export_shards(self, model, folder, dtype) -> bool:
        """Hugging Face weights written by every process (FSDPRanks); one device exports through save_pretrained."""
        return False

    def close(self):
        """Release the layout's process groups (FSDPRanks) at the end of a run: nothing to release here."""


class FSDPRanks:
    """One process per device (trainer: FSDPTrainer), ranks from the environment (torchrun, or train.py's own
    launcher). Each keeps 1/world_size of the policy's weights, gradients and optimizer state and trains on its own
    share of every global batch; gradients are summed over processes, so the update is exactly OneDevice's on the
    whole batch. With fsdp.replicate = R > 1 (HSDP) the mesh is 2-D, R replicas x world_size/R shards: ranks
    r*S .. r*S+S-1 (one node under torchrun) share one copy, each replica keeps a full copy sharded S ways;
    gradients are reduce-scattered (summed) within a replica, then all-reduced (summed) across replicas, so only
    1/S of them cross between nodes, once per step."""

    def __init__(self, cfg):
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        check_batch_split(cfg, self.world_size)
        check_replicate(cfg, self.world_size)
        self.device = models.pick_device(cfg)
        if cfg.fsdp.cpu_offload and self.device.type != "cuda":
            raise UserError("config: fsdp.cpu_offload=true needs CUDA devices (on CPU the weights are in CPU memory already)")
        if self.device.type == "cpu" or cfg.fsdp.cpu_offload:  # FSDP's per-unit buffers are then host memory
            return_freed_blocks()
        # nccl on GPUs, gloo on CPU; the timeout turns a dead rank or node into an error everywhere instead of a hang
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=cfg.fsdp.timeout_minutes))
        replicate = cfg.fsdp.replicate
        self.checkpoint_group = None  # for fsdp.async_checkpoint (save_sharded)
        self.mesh = (init_device_mesh(self.device.type, (self.world_size,)) if replicate == 1 else
                     init_device_mesh(self.device.type, (replicate, self.world_size // replicate),
                                      mesh_dim_names=("replicate", "shard")))  # fully_shard: HSDP on a 2-D mesh

    def local_share(self, examples):
        """A disjoint strided share: rank r takes examples r, r + world_size, ... of the global batch."""
        return examples[self.rank::self.world_size]

    def reduce_sums(self, sums: dict) -> dict:
        keys = sorted(sums)  # the same keys on every process: each runs the same micro-batches
        values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(keys, values.tolist()))

    def any_process(self, flag: bool) -> bool:
        """All-reduce (MAX) of a flag; a collective, so it also serves as a barrier."""
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather(self, tensor):
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous())
        return torch.stack(out)

    def clip_gradients(self, model, max_norm) -> float:
        """The norm of the full gradient: each process has a shard (a DTensor), so the total is reduced first."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def full_state_dict(self, model, frozen=True):
        """Gathered on rank 0 (in CPU memory, so a model larger than one GPU still exports); {} elsewhere.
        frozen=False: only the trainable weights (a LoRA adapter), not the frozen base."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=not frozen))

    def export_shards(self, model, folder, dtype) -> bool:
        """The model's weights as Hugging Face safetensors files (+ model.safetensors.index.json) in `folder`, in
        `dtype`, without a gather: every process writes its own shards (DCP's Hugging Face writer), which rank 0 then
        consolidates tensor by tensor into the files from_pretrained reads; no process holds the whole model.
        False (nothing written) for a model whose checkpoint format transformers converts tensor by tensor (MoE
        experts): that export is gathered on rank 0."""
        state = sharding.checkpoint_names(model, get_model_state_dict(model))
        if state is None:
            return False
        state = {k: v.to(dtype) for k, v in state.items()}
        mapping = export_files(state)
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(folder, fqn_to_index_mapping=mapping,
                                                                save_distributed=True, enable_consolidation=True))
        if self.rank == 0:
            shutil.rmtree(os.path.join(folder, "sharded"))  # the per-process files, now consolidated
        return True

    def save_sharded(self, model, optimizer, path, background=False):
        """torch.distributed.checkpoint: every process writes its own shards; a later run may use another world size.
        Trained weights only: a LoRA run's frozen base is rebuilt from the config, not saved at every step.
        Returns a future, done when this process's files are written. background=True (fsdp.async_checkpoint):
        the state is copied (staged) now and written by a background thread while training goes on; its
        collectives use a process group of their own, so they never interleave with training's."""
        state = {"model": get_model_state_dict(model, options=TRAINED_ONLY),
                 "optimizer": get_optimizer_state_dict(model, optimizer, options=TRAINED_ONLY)}
        if background:
            if self.checkpoint_group is None:
                self.checkpoint_group = dist.new_group(backend="gloo")  # CPU collectives, also next to nccl
            return dcp.async_save(state, checkpoint_id=path, process_group=self.checkpoint_group)
        done = Future()
        try:
            dcp.save(state, checkpoint_id=path)
            done.set_result(None)
        except (Exception, CheckpointException) as e:  # disk full, ...: reported with the rest of the save
            done.set_exception(e)
        return done


    def close(self):
        """Shut the process groups down (async checkpoints' own first, then the default one) before the process
        exits, rather than leaving them to the interpreter's teardown."""
        if self.checkpoint_group is not None:
            dist.destroy_process_group(self.checkpoint_group)
            self.checkpoint_group = None
        if dist.is_initialized():
            dist.destroy_process_group()


def return_freed_blocks(threshold=128 * 1024):
    """Make glibc's malloc serve every block of `threshold` bytes or more (its own default, 128 KiB) by mmap, so
    that it goes back to the system when freed. FSDP allocates and frees each unit's full weights, gradients and
    collective buffers (MBs each) in every forward and backward; by default glibc raises its mmap threshold to the
    size of each such block freed (up to 32 MiB), then serves them from its heap, which fragments and is not
    returned: on CPU a process grew to 3-6 x the model's float32 size F in two DPO steps, where its state is 1.5 F
    (bench/README.md, FSDP memory during training; measured without a CPU-time cost). A MALLOC_MMAP_THRESHOLD_ the
    user set wins; other C libraries are left as they are."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, threshold)  # M_MMAP_THRESHOLD (malloc.h); setting it also ends glibc's dynamic adjustment


TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)  # what sharded checkpoints hold (all weights, unless LoRA)
LAYOUTS = {"BasicTrainer": OneDevice, "FSDPTrainer": FSDPRanks}  # config `trainer:` -> layout


def export_files(state, smallest=2**28) -> dict:
    """{name: file number from 1} for an FSDP export: files in key order, each of at most a quarter of the model, but
    at least `smallest` bytes (256 MiB) and at most 5 GB (a larger tensor alone in its file). DCP's writer turns a
    file's local tensors into one bytes object (safetensors' save) and holds them twice meanwhile, so each process's
    export peaks at 2 / world_size of a file above its state: with one file that was 2 F / world_size."""
    total = sum(value.numel() * value.element_size() for value in state.values())
    limit, files, size, mapping = min(5 * 2**30, max(total // 4, smallest)), 1, 0, {}
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > limit:
            files, size = files + 1, 0
        mapping[key], size = files, size + nbytes
    return mapping
