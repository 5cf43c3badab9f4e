"""User-facing errors, the hub reachability probe, seeding and RNG state, atomic writes, sizes in messages (the
config: config.py; checkpoint folders: checkpoints.py; metrics: metrics.py).

Nothing here imports torch at module level: the config is loaded and checked (train.py does that first) in well under a
second, before torch and transformers are imported.
"""
import os
import random
import sys
import threading
import urllib.error
import urllib.request

import numpy as np


class UserError(Exception):
    """A mistake the user can fix (config, paths, data). train.py prints it as one line and exits with code 2."""


class TrainingError(Exception):
    """Training cannot go on (diverged, disk full). train.py prints it as one line and exits with code 1."""


_HUB_PROBES = {}  # endpoint -> reachable: one probe per process


def check_hub_reachable(name, key, repo_type="model"):
    """Before loading `name` (named by config key `key`) from the Hugging Face hub: fail at once with one line when
    it is not a local path nor in the local hub cache and the hub cannot be used, instead of the library's minute of
    retries: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (HF_DATASETS_OFFLINE for datasets) is set, or an HTTP request to
    the endpoint (through the proxy the environment sets, as the library's own; made once per process) gets no
    answer within ~4 s. An answer, not a TCP connection: a firewall or proxy that accepts connections and then never
    answers made a connection probe pass and the library retry for a minute. Needs no torch."""
    from huggingface_hub import constants
    if os.path.exists(os.path.expanduser(name)):
        return
    snapshots = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{name.replace('/', '--')}", "snapshots")
    if os.path.isdir(snapshots) and os.listdir(snapshots):
        return  # cached: the library falls back to it
    flags = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    flag = next((f for f in flags if os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE")), None)
    if flag:
        raise UserError(f"config: {key}: '{name}' is neither a local folder (no {os.path.abspath(os.path.expanduser(name))}) "
                        "nor in the local Hugging Face cache, and "
                        f"{flag}={os.environ[flag]} is set: download it first (without {flag}) or give a local folder")
    if constants.ENDPOINT not in _HUB_PROBES:
        reached = []

        def probe():  # in a thread, joined with a timeout: name resolution has no timeout of its own
            try:
                urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT + "/api/models?limit=1", method="HEAD"),
                                       timeout=3).close()
                reached.append(True)
            except urllib.error.HTTPError:  # an answer, even 4xx/5xx: the hub (or a mirror) is there
                reached.append(True)
            except (OSError, ValueError):  # no route, refused, timed out, TLS failure, a bad endpoint URL
                pass
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(4)
        _HUB_PROBES[constants.ENDPOINT] = bool(reached)
    if not _HUB_PROBES[constants.ENDPOINT]:
        raise UserError(f"config: {key}: '{name}' is not a local folder (no {os.path.abspath(os.path.expanduser(name))}) "
                        "and the Hugging Face hub cannot be reached (no network?): download it first or give a local "
                        "folder (HF_HUB_OFFLINE=1 skips this check)")


class SurvivingStream:
    """stdout / stderr that outlive their reader. Ctrl-C in a terminal reaches `python train.py ... | tee log` and
    `tee` together: once `tee` is gone a write raises BrokenPipeError, which in the middle of the interrupt handler,
    an eval line or the resume hint would end the run without its checkpoint. The first failed write points the
    file descriptor at /dev/null instead (so the interpreter's final flush is quiet too); later output is dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # BrokenPipeError; ValueError: the stream was closed
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._to_devnull()

    def _to_devnull(self):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the wrapped stream's
        return getattr(self.stream, name)


def abort_now(say=True):
    """A second Ctrl-C: stop at once with exit code 130, no traceback, no waiting for logger threads to drain."""
    if say:
        print("aborted (no checkpoint saved for the current step)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def write_atomic(path, text: str):
    """Write a file so that a crash leaves either the old or the new content, never half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_seed(seed: int):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator's state, as plain tensors and tuples (loadable with torch.load(weights_only=True))."""
    import torch
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    import torch
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def human_bytes(n) -> str:
    """1.5 GiB, 340 MiB, 12 KiB: sizes in messages, never "0.0 GiB" for a small one."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"
