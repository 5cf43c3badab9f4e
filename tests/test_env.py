"""Environment variables from the seed: XDG_CACHE_HOME (cache root) and WANDB_CACHE_DIR (WandB's cache)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_xdg_cache_home_holds_the_datasets_cache(tmp_path):
    """XDG_CACHE_HOME is where cached files go: the `datasets` cache (and the HF hub cache) follow it."""
    import datasets as hf_datasets
    parquet = tmp_path / "pairs.parquet"
    records = json.load(open(os.path.join(ROOT, "tests", "fixtures", "dpo_seed.json")))
    hf_datasets.Dataset.from_list(records).to_parquet(str(parquet))
    cache = tmp_path / "xdg"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE")}
    proc = subprocess.run([sys.executable, "data.py", "check", str(parquet)], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(cache / "huggingface" / "datasets")
