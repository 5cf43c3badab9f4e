"""The online methods end to end: one step's update for any micro-batch split, FSDP == one process, exact resume after
SIGKILL, LoRA, a run that learns (and a control that does not), and the mistakes refused before any model loads."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import rl_losses
import train
from config import load_config
from conftest import OFFLINE_ENV, ROOT, params_of, run_cli
from utils import UserError

GRPO = os.path.join(ROOT, "example", "tiny-grpo.yml")
# 4 prompts a step, 4 completions each, 6 new tokens; SGD with lr 1 makes the update large enough to compare tightly
STEP = ["optimizer=SGD", "lr=1.0", "max_grad_norm=0", "total_batch_size=4", "rollout.num_generations=4",
        "rollout.max_new_tokens=6", "n_eval_examples=0", "report_to_tensorboard=false", "print_log_step=1"]
METHODS = {  # what each exercises besides its own maths
    "grpo": ["loss.beta=0.04"],                       # k3 KL in the loss: a reference model
    "dr_grpo": [],
    "dapo": [],                                       # token mean over the global batch
    "gspo": ["rollout.num_iterations=2"],             # the sequence ratio off-policy (second pass)
    "rloo": [],                                       # k1 folded into the reward (beta 0.05): a reference model
    "reinforce_pp": ["rollout.num_generations=1"],    # whitened over the global batch, one completion per prompt
}


def weights(folder):
    """A checkpoint's tensors, one file (BasicTrainer) or the FSDP export's shards."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def trainer_for(name, *overrides):
    return train.build_trainer(load_config(GRPO, [f"loss.name={name}", *STEP, *METHODS[name], *overrides]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_is_the_same_for_any_micro_batch_split(name):
    """The same rollout (seeded per prompt) trained in 1 micro-batch and in 4: the same update, the same metrics.
    The loss of each micro-batch is normalised over the whole global batch (tokens, sequences, whitening)."""
    updates, metrics = [], []
    for accumulation in (1, 4):
        trainer = trainer_for(name, f"gradient_accumulation_steps={accumulation}")
        before = params_of(trainer.policy)
        step_metrics, *_ = trainer.train_step(next(trainer.global_batches()))
        after = params_of(trainer.policy)
        updates.append({k: after[k] - before[k] for k in before})
        metrics.append(step_metrics)
    largest = max(u.abs().max().item() for u in updates[0].values())
    assert largest > 1e-4, "the step changed nothing"
    for k in updates[0]:
        torch.testing.assert_close(updates[1][k], updates[0][k], rtol=0, atol=2e-5 * largest)
    for k in ("loss", "reward", "clip_ratio/region_mean", "completions/mean_length"):
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-4, abs=1e-6), k
    assert {"reward", "reward_std", "frac_reward_zero_std", "completions/clipped_ratio", "entropy",
            "rewards/write_what_is_asked/mean", "rewards/write_what_is_asked/std", "clip_ratio/low_mean",
            "clip_ratio/high_mean", "frac_reward_unscored"} <= set(metrics[0])
    assert ("kl" in metrics[0]) == (rl_losses.resolve(rl_losses.ONLINE[name], *(
        [0.04] if name == "grpo" else [None]))["beta"] > 0)


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_fsdp_two_processes_match_one(name, tmp_path):
    """FSDPTrainer, 2 gloo processes (each samples its prompts' groups), against BasicTrainer: the same weights to
    1e-5 of the update after 2 steps; dapo's token normaliser and the reward metrics span both processes."""
    common = [f"loss.name={name}", *STEP, *METHODS[name], "n_examples=8", "n_epochs=null"]
    basic = tmp_path / "basic"
    assert train.main(GRPO, [*common, f"output_dirs={basic}"]) == 0
    proc = run_cli("train.py", GRPO, "--overrides", "trainer=FSDPTrainer", f"output_dirs={tmp_path / 'fsdp'}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial = params_of(trainer_for(name).policy)
    one, two = weights(basic / "final"), weights(tmp_path / "fsdp" / "final")
    assert one.keys() == two.keys()
    largest = max((one[k] - initial[k]).abs().max().item() for k in one if k in initial)
    assert largest > 1e-4
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5 * largest)
    rows = lambda run: [r for r in map(json.loads, open(run / "metrics.jsonl")) if "reward" in r]  # noqa: E731
    for a, b in zip(rows(basic), rows(tmp_path / "fsdp")):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6) and b["loss"] == pytest.approx(a["loss"], abs=1e-5)


# a reward with no spread for the prompts of odd length (their groups teach a group baseline nothing) and a spread for
# the others: what dynamic sampling drops and refills
HALF_FLAT = f"rewards=[{{function: {os.path.join(ROOT, 'tests', 'fixtures', 'half_flat_reward.py')}:half_flat}}]"
DYNAMIC = ["loss.name=dapo", "rollout.dynamic_sampling=true", HALF_FLAT]


def test_dynamic_sampling_trains_only_groups_with_a_spread():
    """DAPO's dynamic sampling: the groups of the odd-length prompts (all rewards equal) are dropped and refilled
    from further rounds of prompts until the batch is full; without it they are trained (advantage 0)."""
    trainer = trainer_for("dapo", *DYNAMIC[1:])
    metrics = trainer.train_step(next(trainer.global_batches()))[0]
    assert metrics["dynamic_sampling/rounds"] >= 2 and metrics["dynamic_sampling/filled_ratio"] == 0, metrics
    assert metrics["frac_reward_zero_std"] == 0, metrics
    plain = trainer_for("dapo", HALF_FLAT)
    examples = next(plain.global_batches())
    flat = sum(len(ex["prompt"][-1]["content"]) % 2 for ex in examples) / len(examples)  # the groups surely flat
    metrics = plain.train_step(examples)[0]
    assert flat <= metrics["frac_reward_zero_std"] < 1 and "dynamic_sampling/rounds" not in metrics, (flat, metrics)
    # rounds run out: the missing groups are filled with dropped ones (and said so)
    trainer = trainer_for("dapo", *DYNAMIC[1:], "rollout.max_sampling_rounds=1")
    metrics = trainer.train_step(next(trainer.global_batches()))[0]
    assert metrics["dynamic_sampling/rounds"] == 1
    assert metrics["dynamic_sampling/filled_ratio"] == metrics["frac_reward_zero_std"] > 0, metrics


def test_fsdp_dynamic_sampling_fills_every_process(tmp_path):
    """2 gloo processes: each fills its own share of groups with a spread; the refill rounds run on every process
    until all are full (a process that is full still takes part: the weights are gathered collectively)."""
    run = tmp_path / "fsdp"
    proc = run_cli("train.py", GRPO, "--overrides", "trainer=FSDPTrainer", f"output_dirs={run}", *STEP, *DYNAMIC,
                   "n_examples=8", "n_epochs=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "reward" in r]
    assert len(rows) == 2 and all(r["dynamic_sampling/rounds"] >= 2 and r["frac_reward_zero_std"] == 0 for r in rows)


ONLINE_DPO = ["loss.name=dpo", "loss.online=true", "loss.beta=0.1"]


def test_online_pairs_are_the_best_and_worst_and_ties_weigh_nothing():
    """loss.online on a pair loss: each prompt's best and worst completion by reward are its pair; a group whose
    rewards tie is kept with weight 0 and counted. The step is the same in 1 micro-batch and in 4 (the normaliser
    counts the untied pairs of the whole batch)."""
    updates, metrics = [], []
    for accumulation in (1, 4):
        trainer = trainer_for("grpo", *ONLINE_DPO, HALF_FLAT, f"gradient_accumulation_steps={accumulation}")
        examples = next(trainer.global_batches())
        work = trainer.objective.prepare(trainer, examples, examples)
        before = params_of(trainer.policy)
        metrics.append(trainer.train_step(examples)[0])
        updates.append({k: v - before[k] for k, v in params_of(trainer.policy).items()})
    flat = sum(len(ex["prompt"][-1]["content"]) % 2 for ex in examples) / len(examples)
    weights = [item["pair_weight"] for item in work.items]
    assert metrics[0]["pairs/tied_ratio"] == pytest.approx(1 - sum(weights) / len(weights))
    assert metrics[0]["pairs/tied_ratio"] >= flat > 0
    assert work.norm["examples"] == sum(weights) and 0 < sum(weights) < len(weights)
    for item in work.items:  # chosen and rejected: two of the prompt's completions, scored best and worst
        n = len(item["prompt_input_ids"])
        assert item["chosen_labels"][:n] == [-100] * n and item["chosen_input_ids"][:n] == item["prompt_input_ids"]
    largest = max(u.abs().max().item() for u in updates[0].values())
    assert largest > 1e-4
    for k in updates[0]:
        torch.testing.assert_close(updates[1][k], updates[0][k], rtol=0, atol=2e-5 * largest)
    for k in ("loss", "rewards/accuracies", "rewards/margins", "reward"):
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("method", [["loss.name=grpo"], DYNAMIC, ONLINE_DPO], ids=["grpo", "dapo-dynamic", "online-dpo"])
def test_killed_run_resumes_exactly(method, tmp_path):
    """SIGKILL after the step-2 checkpoint, then resume=auto: the final weights are bit-identical to an uninterrupted
    run's (the rollouts' seeds follow the step, dynamic sampling's refill prompts too; sampling leaves the global
    RNG alone)."""
    whole, run = killed_and_resumed([*method, *STEP, "n_examples=24", "n_epochs=null", "save_model_step=2", "lr=0.05"],
                                    tmp_path)
    a, b = weights(whole / "final"), weights(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(run / "final" / "trainer_state.json"))["step"] == 6


def killed_and_resumed(common, tmp_path):
    """(whole, run): tiny-grpo.yml with `common` run uninterrupted into `whole`, and into `run` killed (SIGKILL) once
    its step-2 checkpoint is complete, then resumed with resume=auto."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train.main(GRPO, [*common, f"output_dirs={whole}"]) == 0
    args = [sys.executable, "train.py", GRPO, "--overrides", *common, f"output_dirs={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "step-000002" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert train.main(GRPO, [*common, f"output_dirs={run}", "resume=auto"]) == 0
    return whole, run


# the example's settings, 40 steps of 16 prompts x 8 completions, evaluated greedily at the start and the end
LEARN = ["n_examples=640", "eval_every_steps=40", "eval_num_generations=1", "report_to_tensorboard=false",
         "sample_during_eval=false"]


def eval_rewards(run):
    return [r["eval/reward"] for r in map(json.loads, open(run / "metrics.jsonl")) if "eval/reward" in r]


def test_it_learns_and_shuffled_advantages_do_not(tmp_path, monkeypatch):
    """example/tiny-grpo.yml, 40 steps: the greedy reward on the held-out prompts (numbers or words, as the prompt
    asks) climbs; the same run with each rollout's advantages shuffled (no link between a completion and its
    reward) does not."""
    assert train.main(GRPO, [*LEARN, f"output_dirs={tmp_path / 'learns'}"]) == 0
    learned = eval_rewards(tmp_path / "learns")
    real = rl_losses.advantages
    g = torch.Generator().manual_seed(0)
    shuffled = lambda *a, **k: (lambda adv: adv[torch.randperm(len(adv), generator=g)])(real(*a, **k))  # noqa: E731
    monkeypatch.setattr(rl_losses, "advantages", shuffled)
    assert train.main(GRPO, [*LEARN, f"output_dirs={tmp_path / 'shuffled'}"]) == 0
    control = eval_rewards(tmp_path / "shuffled")
    assert learned[0] == control[0] and len(learned) == len(control) == 2
    assert learned[-1] > learned[0] + 0.3 and control[-1] < control[0] + 0.15, (learned, control)


def test_truncated_completions_can_be_left_out_of_the_loss():
    """rollout.mask_truncated: a completion cut by max_new_tokens (6 here; a model from scratch rarely ends a reply
    that soon) gets no loss, one that ended with its eos keeps all its tokens; without it every token counts."""
    for masked in (True, False):
        trainer = trainer_for("dapo", f"rollout.mask_truncated={str(masked).lower()}")
        examples = next(trainer.global_batches())
        work = trainer.objective.prepare(trainer, examples, examples)
        eos = trainer.tokenizer.eos_token_id
        completions = [[t for t in item["labels"] if t != -100] for item in work.items]
        cut = [len(c) == 6 and c[-1] != eos for c in completions]
        assert sum(cut) > len(cut) // 2
        kept = work.stats["mask"].sum(1).tolist()
        assert kept == [0 if masked and c else len(ids) for c, ids in zip(cut, completions)]
        assert work.metrics["completions/clipped_ratio"] == pytest.approx(sum(cut) / len(cut))
        assert work.norm["tokens"] == sum(kept)


def test_lora_trains_the_adapter_against_the_base_as_reference():
    trainer = trainer_for("grpo", "model.lora={r: 4}", "loss.beta=0.1")
    before = params_of(trainer.policy)
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    after = params_of(trainer.policy)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)  # on-policy, first step: the adapter starts at zero


@pytest.mark.parametrize("overrides, needle", [
    (["rollout.num_generations=1"], "rollout.num_generations must be >= 2"),
    (["rewards=[]"], "needs rewards"),
    (["rewards=[{function: nope.py:f}]"], "nope.py"),
    (["rewards=[{function: example/rewards.py:missing}]"], "missing"),
    (["rewards=[{function: os.path:join}]"], "join"),
    (["packing=true"], "packing=true does not apply to loss.name=grpo"),
    (["precompute_reference_logps=true"], "precompute_reference_logps=true does not apply"),
    (["rewards=[{function: format, pattern: '('}]"], "not a regular expression"),
    (["rewards=[{function: overlong}]"], "reward 'overlong' needs max_length and buffer"),
    (["loss.name=reinforce_pp", "rollout.num_generations=1", "rollout.dynamic_sampling=true"],
     "rollout.dynamic_sampling=true drops groups"),
    (["loss.name=dpo", "loss.online=true", "rollout.num_generations=1"],
     "loss.name=dpo with loss.online=true compares each completion"),
])
def test_mistakes_are_one_line_before_any_model_loads(overrides, needle, tmp_path, capsys):
    code = train.cli([GRPO, "--overrides", *overrides, f"output_dirs={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError):
        load_config(GRPO, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# A trained reward model as a reward
# ---------------------------------------------------------------------------------------------------------------------
QA_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # not the policy's template


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A reward model trained 4 steps on the demo pairs (loss.name=reward_model), its chat template then replaced by
    another one: the reward must render conversations with the reward model's own."""
    run = tmp_path_factory.mktemp("rm") / "tiny-rm"
    overrides = ["loss.name=reward_model", "loss.beta=null", "n_examples=64", "n_epochs=null", "n_eval_examples=0",
                 f"output_dirs={run}"]
    assert train.main(os.path.join(ROOT, "example", "tiny-dpo.yml"), overrides) == 0
    (run / "final" / "chat_template.jinja").write_text(QA_TEMPLATE)
    return run / "final"


def test_a_reward_model_scores_with_its_own_template(reward_model_dir):
    """ModelReward against transformers alone: the reward model's tokenizer renders prompt + completion with its
    template, and AutoModelForSequenceClassification's own pooling (the last non-pad token) gives the same scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rewards
    reward = rewards.load_rewards([{"model": str(reward_model_dir), "weight": 2.0}])[0]
    assert (reward.name, reward.weight) == ("tiny-rm", 2.0)
    prompts = [[{"role": "user", "content": "Please write words."}], "Write some numbers."]
    completions = [[{"role": "assistant", "content": "hello there"}], "1 2 3"]
    got = reward.fn(prompts=prompts, completions=completions, completion_ids=[[], []])
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    texts = ["user: Please write words.\nassistant: hello there\n", "user: Write some numbers.\nassistant: 1 2 3\n"]
    want = [model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits.item() for text in texts]
    assert got == pytest.approx(want, abs=1e-5) and got[0] != got[1]


def test_grpo_trains_against_a_reward_model(reward_model_dir):
    """Beside a reward function: both logged on their own, their weighted sum trained."""
    both = f"rewards=[{{model: {reward_model_dir}}}, {{function: example/rewards.py:write_what_is_asked, weight: 0.5}}]"
    trainer = trainer_for("grpo", both)
    metrics = trainer.train_step(next(trainer.global_batches()))[0]
    assert math.isfinite(metrics["rewards/tiny-rm/mean"]) and metrics["rewards/tiny-rm/std"] > 0, metrics
    assert metrics["reward"] == pytest.approx(
        metrics["rewards/tiny-rm/mean"] + 0.5 * metrics["rewards/write_what_is_asked/mean"], abs=1e-5)


@pytest.mark.parametrize("entry, needle", [
    ("{model: TINY}", "is not a reward model (a LlamaForCausalLM without a scalar head)"),
    ("{model: /nowhere/rm}", "rewards[0].model: '/nowhere/rm' does not exist"),
    ("{model: TINY, function: math}", "rewards[0] needs a function"),
])
def test_reward_model_mistakes_are_one_line(entry, needle, tiny_model_dir, tmp_path, capsys):
    code = train.cli([GRPO, "--overrides", f"rewards=[{entry.replace('TINY', tiny_model_dir)}]",
                      f"output_dirs={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


# A reward model whose tokenizer is not the policy's: another vocabulary (a byte-level BPE of 300 tokens trained here,
# its own special tokens <pad> and </s>, so even the byte tokens sit at other ids than example/tokenizer's) and another
# template. The reward must re-tokenize the text; the policy's ids would mean other tokens to it, or none at all.
OTHER_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Bot:\\n' }}{% generation %}"
                  "{{ m['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}"
                  "{{ 'User: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'Bot:\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def other_tokenizer_reward_model(tmp_path_factory):
    """(the reward model folder, its tokenizer folder): the tokenizer above, and a reward model trained 2 steps on the
    demo pairs (example/tiny-reward-model.yml) with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("other-tok")
    with open(os.path.join(ROOT, "example", "data", "dpo_demo.json")) as f:
        corpus = [" ".join([*(t["value"] for t in r["conversations"]), r["chosen"]["value"], r["rejected"]["value"]])
                  for r in json.load(f)[:100]] + ["User: Bot:"] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token=None,
                                 unk_token=None, padding_side="right", clean_up_tokenization_spaces=False)
    hf.chat_template = OTHER_TEMPLATE
    hf.save_pretrained(root / "tokenizer")
    run = root / "other-tok-rm"
    overrides = [f"model.tokenizer_name_or_path={root / 'tokenizer'}", "n_examples=32", "n_epochs=null",
                 "n_eval_examples=0", "warmup_steps=0", "report_to_tensorboard=false", f"output_dirs={run}"]
    assert train.main(os.path.join(ROOT, "example", "tiny-reward-model.yml"), overrides) == 0
    return run / "final", root / "tokenizer"


def test_a_reward_model_with_another_tokenizer_scores_its_own_tokens(other_tokenizer_reward_model):
    """ModelReward against transformers alone on the reward model's folder (its tokenizer, its template, its pooling),
    for a conversation and for plain text; the policy's tokenizer writes the same text with other ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rewards
    folder, tokenizer_dir = other_tokenizer_reward_model
    tokenizer, policy_tokenizer = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(
        os.path.join(ROOT, "example", "tokenizer"))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    assert len(tokenizer) == 300 != len(policy_tokenizer)
    text = "Good question! 405 is bigger than 395."
    ids, policy_ids = (t(text, add_special_tokens=False)["input_ids"] for t in (tokenizer, policy_tokenizer))
    assert ids != policy_ids and tokenizer.decode(ids) == policy_tokenizer.decode(policy_ids) == text
    assert max(policy_ids) >= len(tokenizer)  # some of the policy's ids are not even in the reward model's embedding
    assert tokenizer.eos_token_id != policy_tokenizer.eos_token_id

    reward = rewards.load_rewards([{"model": str(folder)}])[0]
    assert reward.name == "other-tok-rm"
    prompts = [[{"role": "user", "content": "Is 405 larger than 395?"}], "Write some numbers.", "Please write words."]
    completions = [[{"role": "assistant", "content": text}], "1 2 3", "idk, leave me alone."]
    got = reward.fn(prompts=prompts, completions=completions, completion_ids=[[], [], []])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = [f"User: Is 405 larger than 395?\nBot:\n{text}</s>\n", "User: Write some numbers.\nBot:\n1 2 3</s>\n",
             "User: Please write words.\nBot:\nidk, leave me alone.</s>\n"]
    with torch.no_grad():
        want = [model(**tokenizer(t, add_special_tokens=False, return_tensors="pt")).logits.item() for t in texts]
    assert got == pytest.approx(want, abs=1e-5) and len(set(got)) == 3, (got, want)


def test_grpo_trains_against_a_reward_model_with_another_tokenizer(other_tokenizer_reward_model):
    """The policy samples ids of its 2048-token vocabulary; the reward model reads the decoded text as its own 300."""
    folder, _ = other_tokenizer_reward_model
    trainer = trainer_for("grpo", f"rewards=[{{model: {folder}}}]")
    metrics = trainer.train_step(next(trainer.global_batches()))[0]
    assert math.isfinite(metrics["rewards/other-tok-rm/mean"]) and metrics["rewards/other-tok-rm/std"] > 0, metrics
    assert metrics["reward"] == pytest.approx(metrics["rewards/other-tok-rm/mean"], abs=1e-5)
