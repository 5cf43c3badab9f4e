"""A user reward file for example/tiny-grpo.yml: a dense reward that depends on the prompt, so that a tiny model
trained from scratch learns it within minutes on a CPU, and has to read the prompt to do so.

    "Please write numbers."  ->  the share of reply tokens that contain a digit
    "Please write words."    ->  the share of reply tokens made of letters only (a leading space allowed)

Any other prompt gets None ("cannot score": no push either way). A reward like "say the number 7" (1 or 0) is too
sparse for a model that starts from random weights: almost every group would be all-0.

Use it in a config as ``rewards: [{function: example/rewards.py:write_what_is_asked}]``.
"""

import functools
import os

from tokenizers import Tokenizer

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "tokenizer.json")


@functools.lru_cache(maxsize=1)
def token_kinds():
    """(ids whose text contains a digit, ids whose text is letters only, special ids) of example/tokenizer."""
    tokenizer = Tokenizer.from_file(TOKENIZER)
    special = {token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    digits, letters = set(), set()
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if any(ch.isdigit() for ch in text):
            digits.add(token_id)
        if text.strip(" ").isalpha():
            letters.add(token_id)
    return digits, letters, special


def prompt_text(prompt):
    """A prompt's text: the string itself, or the last message's content when it is a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def write_what_is_asked(prompts, completions, completion_ids, **kwargs):
    digits, letters, special = token_kinds()
    rewards = []
    for prompt, ids in zip(prompts, completion_ids):
        asked = prompt_text(prompt).lower()
        wanted = digits if "numbers" in asked else letters if "words" in asked else None
        reply = [i for i in ids if i not in special]  # the end-of-sequence token is neither
        if wanted is None:
            rewards.append(None)
        else:
            rewards.append(sum(i in wanted for i in reply) / len(reply) if reply else 0.0)
    return rewards
