"""Shared fixtures: no network, one CPU thread, a tiny local model folder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Everything offline and reproducible; set before transformers / datasets / wandb are imported by the tests.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
               "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402
from config import load_config

torch.set_num_threads(1)

TOKENIZER = os.path.join(ROOT, "example", "tokenizer")
TINY_ARCH = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved HF model + tokenizer folder (random weights), standing in for a hub model such as pythia."""
    return save_model_folder(tmp_path_factory.mktemp("tiny-model"), TINY_ARCH)


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
    """A reward model folder (random weights): TINY_ARCH with a scalar head (AutoModelForSequenceClassification,
    one label) and the example tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    path = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    arch = dict(TINY_ARCH)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), num_labels=1, **arch)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_model_folder(path, arch):
    """A model of architecture `arch` (a from_config dict with its model_type; seed 0) and the example tokenizer,
    saved as a Hugging Face folder at `path`; returns the path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(*args, env=None, cwd=ROOT, timeout=300):
    """Run `python <args>` in a subprocess (fresh interpreter, offline env); returns the CompletedProcess."""
    import subprocess
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    """Exit code 2, a single 'error: ...' line on stderr naming every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- helpers shared by the test modules (import them from conftest, never from another test module) ----

TINY = {"sft": os.path.join(ROOT, "example", "tiny-sft.yml"), "dpo": os.path.join(ROOT, "example", "tiny-dpo.yml")}
TIED = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, " \
       "num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true}"


def local_model_overrides(model_dir):
    return [f"model.name_or_path={model_dir}", "model.from_config=null", "model.tokenizer_name_or_path=null"]


def read_jsonl(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


def params_of(model):
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def build(kind, model_dir, *overrides):
    """A trainer for the tiny SFT / DPO example on the local model folder, in this process (no eval examples)."""
    import train
    cfg = load_config(TINY[kind], [*local_model_overrides(model_dir), "n_eval_examples=0", *overrides])
    return train.build_trainer(cfg)


SGD_STEP = ("optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0", "total_batch_size=4")  # one_sgd_step's settings


def one_sgd_step(kind, model_dir, *overrides):
    """One SGD step (lr 1, no warmup, no clipping) on 4 examples: the parameter update, and the step's metrics plus
    saved_elements (the elements autograd kept for backward)."""
    return sgd_update(build(kind, model_dir, *SGD_STEP, *overrides))


def sgd_update(trainer):
    """The parameter update of the trainer's next step, and the step's metrics plus saved_elements."""
    before = params_of(trainer.policy)
    saved = [0]  # elements autograd keeps for backward: far fewer when activations are recomputed

    def pack(tensor):
        saved[0] += tensor.numel()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    metrics["saved_elements"] = saved[0]
    return {k: v - before[k] for k, v in params_of(trainer.policy).items()}, metrics


def close_updates(a, b, rtol=1e-4):
    """Two parameter updates agree to rtol of the largest change in b."""
    largest = max(v.abs().max().item() for v in b.values())
    for k in b:
        assert (a[k] - b[k]).abs().max().item() <= rtol * largest, k
