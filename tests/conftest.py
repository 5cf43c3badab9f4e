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

torch.set_num_threads(1)

TOKENIZER = os.path.join(ROOT, "example", "tokenizer")
TINY_ARCH = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved HF model + tokenizer folder (random weights), standing in for a hub model such as pythia."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    arch = dict(TINY_ARCH)
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
