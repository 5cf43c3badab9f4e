"""A trained reward model as a reward of the online methods: `rewards: [{model: PATH_OR_HUB_ID, weight: 1.0}]`, alone
or beside reward functions.

The model is a scalar head on a language model (AutoModelForSequenceClassification with one label: what
`loss.name: reward_model` trains, or a published reward model). It is frozen and loaded once, at its first call, on
the device the run trains on, and scores each prompt + completion in batches. It reads text with its OWN tokenizer and
chat template: the conversation (the prompt's messages and the completion as the assistant's reply) is rendered
again for it, so a reward model of another family than the policy scores what it was trained on. Each reply is
scored at its last token (models.sequence_scores), as training scored it.
"""
import math
import os

import torch
import torch.distributed as dist

from utils import UserError

BATCH = 16  # sequences per forward pass


def reward_name(path: str) -> str:
    """The name its metrics take (rewards/<name>/mean): the folder's name; a run's final/ or step-N/ takes the
    run's."""
    parts = os.path.normpath(path).split(os.sep)
    run_folder = len(parts) > 1 and (parts[-1] == "final" or parts[-1].startswith("step-"))
    return (parts[-2] if run_folder else parts[-1]) or "reward_model"


def check_reward_model(path: str, key: str):
    """A one-line error, before any model loads, unless `path` is a scalar-head model (one label)."""
    from transformers import AutoConfig

    import models
    config = models.from_pretrained(AutoConfig, path, key)
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if not heads or config.num_labels != 1:
        what = (f"{config.num_labels} labels" if heads else
                f"a {', '.join(config.architectures or [config.model_type])} without a scalar head")
        raise UserError(f"config: {key}: '{path}' is not a reward model ({what}): it needs a scalar head "
                        "(AutoModelForSequenceClassification, num_labels 1); train one from preference pairs with "
                        "loss.name=reward_model")


class ModelReward:
    """The reward function of a reward model, with TRL's signature (prompts, completions, completion_ids, **columns)."""

    def __init__(self, path: str, key: str, device=None, shard=False):
        """device: the run's ("cpu", "cuda": the current GPU, or a torch.device); None: cuda when there is a GPU.
        shard: under FSDPTrainer (fsdp.shard_reference), shard it over the processes like the reference: the main
        process reads the file, every process keeps 1/world of the weights, and each forward is collective."""
        check_reward_model(path, key)
        self.path, self.key, self.device, self.model, self.tokenizer = path, key, device, None, None
        self.shard, self.sharded = shard, False
        self.__name__ = reward_name(path)

    def load(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        import models
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer = models.from_pretrained(AutoTokenizer, self.path, self.key)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.sharded = self.shard and dist.is_initialized() and dist.get_world_size() > 1
        if self.sharded:
            model = self.load_sharded(device, dtype)
        else:
            model = models.from_pretrained(AutoModelForSequenceClassification, self.path, self.key, dtype=dtype)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)

    def load_sharded(self, device, dtype):
        """The model sharded over all processes (FSDP2, frozen, as models.build_models shards the reference): built
        on the meta device everywhere and filled from the one copy the main process reads."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy
        from transformers import AutoConfig, AutoModelForSequenceClassification

        import models
        import sharding
        source = models.from_pretrained(AutoModelForSequenceClassification, self.path, self.key, dtype=dtype) \
            if dist.get_rank() == 0 else None
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(
                models.from_pretrained(AutoConfig, self.path, self.key), dtype=dtype)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        sharding.shard_model(model, sharding.find_block_class(model, None), mesh, MixedPrecisionPolicy(),
                             OffloadPolicy(), frozen=True)
        sharding.fill_from_main_process(model, source, device, offload=False)
        return model

    def render(self, prompt, completion) -> str:
        """The conversation as the reward model's own chat template writes it (plain text joined by newlines for a
        tokenizer without one)."""
        from rewards import completion_text
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": completion_text(completion)})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **columns) -> list:
        import models
        if self.model is None:
            self.load()
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        device, scores = torch.device(self.model.device), []
        batches = math.ceil(len(texts) / BATCH)
        if self.sharded:  # every process runs as many (collective) forwards as the one with the most batches
            count = torch.tensor([batches], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            batches = int(count)
        for start in range(0, batches * BATCH, BATCH):
            chunk = texts[start:start + BATCH] or [self.tokenizer.eos_token]  # a stand-in for a forward of nothing
            enc = self.tokenizer(chunk, padding=True, truncation=True, add_special_tokens=False,
                                 return_tensors="pt").to(device)
            mask = enc["attention_mask"]
            seq_ids = torch.where(mask.bool(), torch.arange(len(mask), device=device)[:, None], -1)
            batch = {"input_ids": enc["input_ids"], "attention_mask": mask, "seq_ids": seq_ids, "n_seqs": len(mask)}
            scores += models.sequence_scores(self.model, batch).tolist()
        return scores[:len(texts)]
