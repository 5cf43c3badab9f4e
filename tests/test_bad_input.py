"""Bad input through the real entry point: one line naming file/record/field (or key), exit 2, run folder untouched."""
import json
import os
import shutil

import pytest

import models
import train
from conftest import ROOT
from config import load_config

CORPUS = os.path.join(ROOT, "tests", "bad_inputs")

# file in tests/bad_inputs -> (loss, words the one-line error must contain besides the file name)
BAD_DATA = {
    "syntax_error.json": ("dpo", ["invalid JSON", "line 3 column 28"]),
    "trailing_comma.json": ("sft", ["invalid JSON", "line 1"]),
    "lines_with_bad_line.jsonl": ("dpo", ["invalid JSON", "line 3"]),
    "missing_chosen.json": ("dpo", ["record 1", "'chosen'", "missing"]),
    "missing_rejected_value.json": ("dpo", ["record 1", "'rejected.value'", "missing"]),
    "unknown_role.json": ("sft", ["record 1", "messages[1].role", "robot", "system, user, assistant"]),
    "unknown_from.json": ("dpo", ["record 1", "conversations[0].from", "alien", "system, human, gpt"]),
    "non_string_content.json": ("sft", ["record 0", "messages[1].content", "string"]),
    "conversations_not_a_list.json": ("dpo", ["record 0", "'conversations'", "list"]),
    "empty_response.json": ("dpo", ["record 2", "'chosen.value'", "empty"]),
    "no_assistant_turn.json": ("sft", ["record 1", "no assistant message"]),
    "prompt_ends_with_assistant.json": ("dpo", ["record 0", "'conversations'", "must end with a user message"]),
    "mixed_formats.json": ("dpo", ["record 1", "one format per file"]),
    "top_level_object.json": ("dpo", ["JSON list"]),
    "empty.json": ("dpo", ["empty"]),
    "unknown_format.json": ("sft", ["record 0", "unrecognized format", "instruction"]),
    "wrong_encoding.json": ("sft", ["utf-8", "position 85"]),
}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder that already holds a previous run's files: a failing run must leave them exactly as they are."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("exp_name: previous\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return run


def snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def run_and_check(capsys, run_dir, overrides, needles, config="example/tiny-dpo.yml"):
    before = snapshot(run_dir)
    # overwrite=true: even a run told to replace the old one must leave it intact when its input is bad
    code = train.cli([os.path.join(ROOT, config), "--overrides", f"output_dirs={run_dir}", "overwrite=true", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert snapshot(run_dir) == before
    return err[0]


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_dataset(name, run_dir, capsys):
    loss, needles = BAD_DATA[name]
    path = os.path.join(CORPUS, name)
    config = "example/tiny-sft.yml" if loss == "sft" else "example/tiny-dpo.yml"
    run_and_check(capsys, run_dir, [f"datasets=[{{type: custom_dataset, path: {path}}}]", "n_eval_examples=0"],
                  [path, *needles], config=config)


def test_corpus_is_complete():
    assert sorted(BAD_DATA) == sorted(os.listdir(CORPUS))


def test_missing_data_file(tmp_path, run_dir, capsys):
    missing = tmp_path / "nope.json"
    run_and_check(capsys, run_dir, [f"datasets=[{{type: custom_dataset, path: {missing}}}]"], [str(missing)])


def test_sft_data_for_dpo_is_refused(run_dir, capsys):
    run_and_check(capsys, run_dir, ["datasets=[{type: custom_dataset, path: example/data/sft_demo.json}]"],
                  ["sft_demo.json"])


def test_missing_model_path(tmp_path, run_dir, capsys):
    missing = tmp_path / "no-model"
    run_and_check(capsys, run_dir, [f"model.name_or_path={missing}", "model.from_config=null",
                                    "model.tokenizer_name_or_path=null"], ["model.name_or_path", str(missing)])


def test_folder_without_weights(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    run_and_check(capsys, run_dir, [f"model.name_or_path={empty}", "model.from_config=null",
                                    f"model.tokenizer_name_or_path={ROOT}/example/tokenizer"], ["model.name_or_path"])


def test_too_few_examples_for_eval():
    """Not an error any more: n_eval_examples beyond what the data can spare holds out 10% of it, with one warning."""
    import data
    from transformers import AutoTokenizer
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(ROOT, "example", "tokenizer")))
    spec = {"type": "custom_dataset", "path": os.path.join(ROOT, "example", "data", "sft_demo.json")}
    train_data, eval_data, stats = data.build_datasets([spec], [], tokenizer, "sft", 512, 256, 100000, 0)
    assert (len(train_data), len(eval_data)) == (360, 40) and stats["warnings"] == [
        "warning: n_eval_examples=100000 but the data has only 400 records: holding out 40 for evaluation "
        "(set n_eval_examples or eval_datasets)"]


def test_missing_archive(tmp_path, run_dir, capsys):
    run_and_check(capsys, run_dir, [f"model.archive={tmp_path}/x.pt"], ["model.archive", "x.pt"])


def test_preference_data_for_sft_is_refused(run_dir, capsys):
    run_and_check(capsys, run_dir, ["datasets=[{type: custom_dataset, path: example/data/dpo_demo.json}]"],
                  ["dpo_demo.json", "loss.name=sft", "data.py convert"], config="example/tiny-sft.yml")


def test_tokenizer_without_eos_or_pad(tmp_path, run_dir, capsys):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "example", "tokenizer"))
    tokenizer.eos_token = tokenizer.pad_token = None
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tok")
    run_and_check(capsys, run_dir, [f"model.tokenizer_name_or_path={tmp_path / 'tok'}"], ["tokenizer", "eos_token"])


def test_archive_with_wrong_shapes(tmp_path, run_dir, capsys):
    import torch
    bad = tmp_path / "wrong.pt"
    torch.save({"model.embed_tokens.weight": torch.zeros(7, 3)}, bad)
    run_and_check(capsys, run_dir, [f"model.archive={bad}"], [str(bad), "does not match the model"])


def test_huge_record_and_long_prompt_are_truncated_not_fatal(tmp_path):
    """Not errors: a prompt longer than max_length keeps its end, a huge response its start; both are counted."""
    import data
    from transformers import AutoTokenizer
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(ROOT, "example", "tokenizer")))
    pairs = [{"conversations": [{"from": "human", "value": "why? " * 3000}], "chosen": {"from": "gpt", "value": "Yes."},
              "rejected": {"from": "gpt", "value": "no."}},
             {"conversations": [{"from": "human", "value": "Tell me."}], "chosen": {"from": "gpt", "value": "a b " * 200000},
              "rejected": {"from": "gpt", "value": "no."}}]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(pairs))
    train_data, _, stats = data.build_datasets([{"type": "custom_dataset", "path": str(path)}], [], tokenizer,
                                               "preference", 128, 64, 0, 0)
    assert stats["truncated"] == 2 and len(train_data) == 2
    assert all(len(ex["chosen_input_ids"]) <= 128 and len(ex["rejected_input_ids"]) <= 128 for ex in train_data)


def test_optimizer_kwargs_the_optimizer_refuses(run_dir, capsys):
    run_and_check(capsys, run_dir, ["optimizer_kwargs={betas: [2, 3]}"], ["optimizer_kwargs", "AdamW", "beta"])
    run_and_check(capsys, run_dir, ["optimizer_kwargs={betta: 1}"], ["optimizer_kwargs", "betta"])


@pytest.mark.parametrize("value, needles", [("nonsense", ["sdpa", "eager", "varlen_attn", "flash_attention_2"]),
                                            ("sdpaa", ["did you mean 'sdpa'"])])
def test_unknown_attn_implementation(value, needles, run_dir, capsys):
    run_and_check(capsys, run_dir, [f"model.attn_implementation={value}"], ["model.attn_implementation", value, *needles])


def test_from_config_the_architecture_refuses(run_dir, capsys):
    arch = "{model_type: llama, hidden_size: 30, num_attention_heads: 4, intermediate_size: 16, num_hidden_layers: 1}"
    run_and_check(capsys, run_dir, [f"model.from_config={arch}"], ["model.from_config", "hidden size (30)", "heads (4)"])


def test_unknown_model_type_is_short(run_dir, capsys):
    line = run_and_check(capsys, run_dir, ["model.from_config={model_type: lama, hidden_size: 32}"],
                         ["model.from_config.model_type", "'lama'", "did you mean 'llama'", "more"])
    assert len(line) < 300, line


def test_wandb_without_a_login(monkeypatch, tmp_path, run_dir, capsys):
    """No WANDB_API_KEY, no netrc entry, not offline: refused up front (wandb would prompt, or wait forever)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run_and_check(capsys, run_dir, ["wandb.enabled=true"],
                  ["wandb.enabled", "wandb login", "WANDB_API_KEY", "WANDB_MODE=offline"])
    tiny = os.path.join(ROOT, "example", "tiny-dpo.yml")
    assert load_config(tiny, ["wandb.enabled=true", "debug=true"])  # debug: no WandB at all
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert load_config(tiny, ["wandb.enabled=true"])
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load_config(tiny, ["wandb.enabled=true"])


def test_folder_of_gguf_files(tmp_path, run_dir, capsys):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / "model-q4.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    run_and_check(capsys, run_dir, [f"model.name_or_path={folder}", "model.from_config=null",
                                    "model.tokenizer_name_or_path=null"],
                  ["model.name_or_path", "only GGUF files (model-q4.gguf)", "save_pretrained"])


def test_load_error_is_whole_and_capped():
    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            raise OSError("first line of the reason,\n  continued on the second line" + " and more" * 300)
    with pytest.raises(train.UserError) as e:
        models.from_pretrained(Loader, ROOT, "model.name_or_path")
    assert "first line of the reason, continued on the second line" in str(e.value) and len(str(e.value)) < 600


def test_archive_of_junk_bytes_is_not_called_code(tmp_path, run_dir, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(7, 250)) * 4)
    line = run_and_check(capsys, run_dir, [f"model.archive={junk}"], ["model.archive", str(junk), "not a torch state dict file"])
    assert "code" not in line


def test_archive_with_globals_is_refused_as_possibly_code(tmp_path, run_dir, capsys):
    import torch
    bad = tmp_path / "globals.pt"
    torch.save({"weight": torch.zeros(2), "hook": print}, bad)  # a pickled global: what code execution needs
    run_and_check(capsys, run_dir, [f"model.archive={bad}"], ["model.archive", str(bad), "possibly code"])


def test_model_that_needs_remote_code(tmp_path, run_dir, capsys):
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_model", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    run_and_check(capsys, run_dir, [f"model.name_or_path={folder}", "model.from_config=null",
                                    f"model.tokenizer_name_or_path={ROOT}/example/tokenizer"],
                  ["model.name_or_path", "model.trust_remote_code=true"])


def test_hub_id_with_hf_hub_offline(run_dir, capsys):
    """The tests run with HF_HUB_OFFLINE=1 (conftest): an id that is not cached fails at once, saying so."""
    run_and_check(capsys, run_dir, ["model.name_or_path=EleutherAI/pythia-2.8b", "model.from_config=null",
                                    "model.tokenizer_name_or_path=null"],
                  ["model.name_or_path", "'EleutherAI/pythia-2.8b'", "nor in the local Hugging Face cache", "HF_HUB_OFFLINE=1"])


def test_hub_id_without_network_fails_in_seconds(tmp_path):
    """Not offline by flag, but the hub cannot be reached (here: an endpoint nobody listens on): one probe, then
    one line, instead of a minute of retries. The timeout bounds the run; the probe itself waits at most ~3 s."""
    from conftest import assert_one_line_error, run_cli
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HTTP_PROXY": "", "HTTPS_PROXY": "", "ALL_PROXY": ""}
    proc = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={tmp_path}/run",
                   "model.name_or_path=EleutherAI/pythia-2.8b", "model.from_config=null",
                   "model.tokenizer_name_or_path=null", env=env, timeout=90)
    assert_one_line_error(proc, "model.name_or_path", "'EleutherAI/pythia-2.8b'", "cannot be reached",
                          "HF_HUB_OFFLINE=1")
    assert not os.path.exists(tmp_path / "run")


def test_hub_that_accepts_connections_but_never_answers_fails_in_seconds(tmp_path):
    """A firewall or proxy that completes the TCP handshake and then says nothing: a connection is no proof of a hub
    (such a probe passed, and the library then retried for ~55 s). Bounded by the probe's own ~4 s."""
    import socket
    import time
    from conftest import assert_one_line_error, run_cli
    with socket.socket() as silent:  # listens (the kernel completes handshakes), never accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
               "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "HTTP_PROXY": "", "HTTPS_PROXY": "",
               "ALL_PROXY": "", "NO_PROXY": "127.0.0.1"}
        started = time.time()
        proc = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={tmp_path}/run",
                       "model.name_or_path=EleutherAI/pythia-2.8b", "model.from_config=null",
                       "model.tokenizer_name_or_path=null", env=env, timeout=90)
        seconds = time.time() - started
    assert_one_line_error(proc, "model.name_or_path", "'EleutherAI/pythia-2.8b'", "cannot be reached")
    assert seconds < 25, seconds  # start-up (~5-10 s here) + the probe, not the library's retries


def test_hub_check_passes_local_and_cached(tmp_path, monkeypatch):
    import utils
    from huggingface_hub import constants
    utils.check_hub_reachable(ROOT, "model.name_or_path")  # a local folder: no probe, no flag check
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--org--cached" / "snapshots" / "abc").mkdir(parents=True)
    utils.check_hub_reachable("org/cached", "model.name_or_path")
    with pytest.raises(utils.UserError, match="HF_HUB_OFFLINE=1"):
        utils.check_hub_reachable("org/not-cached", "model.name_or_path")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(utils.UserError, match="HF_DATASETS_OFFLINE=1"):
        utils.check_hub_reachable("org/data", "datasets[0].path", repo_type="dataset")


@pytest.mark.parametrize("flags, dtype, warned", [({"avx2", "avx512f"}, "bfloat16", True),
                                                  ({"avx2", "avx512_bf16"}, "bfloat16", False),
                                                  ({"amx_bf16"}, "bfloat16", False),
                                                  ({"avx2"}, "float32", False),
                                                  (set(), "bfloat16", False)])  # unknown CPU: say nothing
def test_bfloat16_on_a_cpu_without_bf16_instructions(flags, dtype, warned, monkeypatch, capsys):
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), ["device=cpu", f"model.policy_dtype={dtype}"])
    assert models.pick_device(cfg).type == "cpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [] if not warned else (len(err) == 1 and "bfloat16" in err[0] and "float32" in err[0]), err


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare (mount namespace)")
def test_read_only_output_folder_is_reported_as_such(tmp_path):
    """output_dirs on a read-only file system was reported as too little free space ('has 1.0 MiB free but one
    checkpoint needs about 2.1 MiB'): it is reported as not writable, checked before the space. A small read-only
    tmpfs (1 MiB, less than a checkpoint needs) in a private mount namespace that ends with the command."""
    import subprocess
    import sys
    mnt = tmp_path / "ro"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1m,ro tmpfs {mnt} && exec {sys.executable} train.py "
              f"example/tiny-dpo.yml --overrides output_dirs={mnt}/run")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m,ro tmpfs {mnt}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount here: {probe.stderr.decode()[:200]}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "cannot write to" in lines[0] and "Read-only file system" in lines[0] and "free" not in lines[0]
