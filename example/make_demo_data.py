"""Generate the small demo datasets used by the examples and tests.

Run from the repository root (stdlib only, deterministic for a given seed)::

    python example/make_demo_data.py && python example/make_tokenizer.py

Writes

* ``example/data/sft_demo.json`` - SFT records ``{"messages": [{"role", "content"}, ...]}``
* ``example/data/dpo_demo.json`` - preference records
  ``{"conversations": [{"from", "value"}, ...], "chosen": {...}, "rejected": {...}}``
* ``example/data/prompts_demo.json`` - prompts for the online methods (example/tiny-grpo.yml), TRL's prompt format
  ``{"prompt": [{"role": "user", "content": "Please write numbers."}]}``: half ask for numbers, half for words

Everything is generated here from templates and random fill (arithmetic, unit conversions, reversing
words, counting letters, facts about an invented little world); nothing is copied from public datasets.

In the preference data the signal is deliberately systematic so that a tiny model can learn it quickly:
``chosen`` is always a correct answer in a polite, complete style ("Sure! 7 + 5 = 12. Hope that helps."),
``rejected`` is a wrong, off-topic or curt answer in a rude style ("dunno. maybe 15. go look it up.").
Both are built as opener + core + closer so their lengths are similar.
"""

from __future__ import annotations

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly and precise assistant.",
    "You are a polite assistant. Answer clearly and correctly.",
    "You are a patient tutor who answers questions step by step.",
]

# ----------------------------------------------------------------------------------------------
# An invented little world: fixed (seeded) facts so that answers are consistent across records.
# ----------------------------------------------------------------------------------------------
_SYLLABLES = ["zor", "bla", "vex", "ka", "mi", "tro", "lun", "qui", "dar", "po", "fen", "sil", "wu", "ren", "tav", "ol"]
_COLORS = ["blue", "green", "orange", "purple", "silver", "yellow", "red", "golden"]
_SIZES = ["tiny", "small", "medium-sized", "large", "huge"]
_FOODS = ["moss", "berries", "pebbles", "river weed", "sunflower seeds", "tiny shrimp", "clouds of pollen"]
_WORDS = [
    "apple", "banana", "river", "garden", "pencil", "window", "rocket", "planet", "orange", "silver",
    "button", "candle", "dragon", "forest", "guitar", "island", "jacket", "kitten", "lemon", "marble",
    "needle", "pepper", "puzzle", "rabbit", "summer", "tomato", "violin", "winter", "yellow", "zipper",
    "bottle", "cookie", "mirror", "pillow", "spider", "ladder", "hammer", "carrot", "castle", "basket",
    "letter", "mammal", "coffee", "balloon", "library", "mountain", "umbrella", "teacher", "penguin", "cabbage",
]


def _make_name(rng: random.Random, n_syl: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n_syl))


def make_world(rng: random.Random) -> dict:
    names: set[str] = set()

    def fresh(n_syl: int) -> str:
        while True:
            name = _make_name(rng, n_syl)
            if name not in names:
                names.add(name)
                return name

    planets = [
        {"name": fresh(2).capitalize(), "moons": rng.randint(0, 9), "color": rng.choice(_COLORS),
         "day_hours": rng.choice([12, 18, 20, 30, 36, 40, 52])}
        for _ in range(8)
    ]
    creatures = [
        {"name": fresh(rng.choice([2, 3])), "legs": rng.choice([0, 2, 4, 6, 8, 10]), "color": rng.choice(_COLORS),
         "size": rng.choice(_SIZES), "food": rng.choice(_FOODS), "home": rng.choice(planets)["name"]}
        for _ in range(12)
    ]
    return {"planets": planets, "creatures": creatures}


# ----------------------------------------------------------------------------------------------
# Task generators. Each returns a dict with
#   q      : the user question
#   a      : the correct answer core, one or two complete sentences
#   wrong  : a wrong answer core in a lowercase, curt form ("maybe 15")
#   follow : optional (question, answer, wrong) for a natural follow-up turn
# ----------------------------------------------------------------------------------------------

def _wrong_int(rng: random.Random, x: int) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return x + delta if x + delta != x else x + 1


def task_arithmetic(rng: random.Random, world: dict) -> dict:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        r = x * y
    else:
        x, y = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and y > x:
            x, y = y, x
        r = x + y if op == "+" else x - y
    q = rng.choice([
        f"What is {x} {op} {y}?",
        f"Can you compute {x} {op} {y}?",
        f"Calculate {x} {op} {y}.",
        f"How much is {x} {op} {y}?",
    ])
    w = _wrong_int(rng, r)
    k = rng.randint(2, 9)
    follow = (
        rng.choice([f"Now add {k} to that.", f"And if I add {k}?", f"What do I get if I add {k} to the result?"]),
        f"{r} + {k} = {r + k}.",
        f"{_wrong_int(rng, r + k)} probably",
    )
    return {"q": q, "a": f"{x} {op} {y} = {r}.", "wrong": rng.choice([f"maybe {w}", f"it's {w} or something", f"{w}"]),
            "follow": follow}


_UNITS = [
    # (from, to, factor, plural_from, plural_to)
    ("km", "m", 1000, "kilometres", "metres"),
    ("m", "cm", 100, "metres", "centimetres"),
    ("kg", "g", 1000, "kilograms", "grams"),
    ("hours", "minutes", 60, "hours", "minutes"),
    ("minutes", "seconds", 60, "minutes", "seconds"),
    ("feet", "inches", 12, "feet", "inches"),
    ("days", "hours", 24, "days", "hours"),
    ("litres", "millilitres", 1000, "litres", "millilitres"),
]


def task_units(rng: random.Random, world: dict) -> dict:
    _, _, factor, pf, pt = rng.choice(_UNITS)
    n = rng.randint(2, 15)
    r = n * factor
    q = rng.choice([
        f"How many {pt} are in {n} {pf}?",
        f"Convert {n} {pf} to {pt}.",
        f"What is {n} {pf} in {pt}?",
    ])
    a = f"There are {factor} {pt} in one unit of {pf}, so {n} {pf} = {n} * {factor} = {r} {pt}."
    if rng.random() < 0.5:
        a = f"{n} {pf} is {r} {pt}, because 1 of them is {factor} {pt}."
    w = r + rng.choice([-factor, factor, factor * 9, -1]) if rng.random() < 0.8 else n * 10
    follow = (f"And {n + 1} {pf}?", f"{n + 1} {pf} = {(n + 1) * factor} {pt}.", f"like {(n + 1) * 10} {pt}")
    return {"q": q, "a": a, "wrong": rng.choice([f"about {w} {pt}", f"{w} {pt} i think", f"{w}"]), "follow": follow}


def task_reverse(rng: random.Random, world: dict) -> dict:
    word = rng.choice(_WORDS)
    rev = word[::-1]
    q = rng.choice([
        f"Spell the word '{word}' backwards.",
        f"What is '{word}' reversed?",
        f"Can you write '{word}' backwards?",
    ])
    letters = list(rev)
    i = rng.randrange(len(letters) - 1)
    letters[i], letters[i + 1] = letters[i + 1], letters[i]
    wrong = "".join(letters) if "".join(letters) != rev else word
    return {"q": q, "a": f"'{word}' spelled backwards is '{rev}'.", "wrong": rng.choice([f"'{wrong}'", f"{wrong} i guess"])}


def task_count(rng: random.Random, world: dict) -> dict:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    c = word.count(letter)
    q = rng.choice([
        f"How many times does the letter '{letter}' appear in '{word}'?",
        f"Count the letter '{letter}' in the word '{word}'.",
        f"How many '{letter}'s are in '{word}'?",
    ])
    times = "time" if c == 1 else "times"
    a = f"The letter '{letter}' appears {c} {times} in '{word}'."
    return {"q": q, "a": a, "wrong": rng.choice([f"{c + rng.choice([1, 2])}", f"like {c + 1}", "zero"])}


def task_length(rng: random.Random, world: dict) -> dict:
    word = rng.choice(_WORDS)
    n = len(word)
    q = rng.choice([f"How many letters are in the word '{word}'?", f"How long is the word '{word}'?"])
    return {"q": q, "a": f"The word '{word}' has {n} letters.", "wrong": rng.choice([f"{n + 2}", f"maybe {n - 1}"])}


def task_compare(rng: random.Random, world: dict) -> dict:
    x, y = rng.sample(range(1, 500), 2)
    q = rng.choice([f"Which is bigger, {x} or {y}?", f"Is {x} larger than {y}?"])
    big, small = max(x, y), min(x, y)
    return {"q": q, "a": f"{big} is bigger than {small}.", "wrong": rng.choice([f"{small} obviously", f"{small}"])}


def task_world(rng: random.Random, world: dict) -> dict:
    if rng.random() < 0.4:
        p = rng.choice(world["planets"])
        kind = rng.choice(["moons", "color", "day"])
        if kind == "moons":
            q = f"How many moons does the planet {p['name']} have?"
            m = p["moons"]
            a = f"The planet {p['name']} has {m} {'moon' if m == 1 else 'moons'}."
            wrong = f"{m + rng.choice([1, 2, 3])} moons"
        elif kind == "color":
            q = f"What color is the planet {p['name']}?"
            a = f"The planet {p['name']} looks {p['color']} from space."
            wrong = rng.choice([c for c in _COLORS if c != p["color"]])
        else:
            q = f"How long is a day on {p['name']}?"
            a = f"A day on {p['name']} lasts {p['day_hours']} hours."
            wrong = f"{p['day_hours'] + rng.choice([-6, 4, 10])} hours"
        return {"q": q, "a": a, "wrong": rng.choice([f"{wrong}", f"{wrong} maybe"])}
    c = rng.choice(world["creatures"])
    kind = rng.choice(["about", "legs", "food", "home"])
    if kind == "about":
        q = rng.choice([f"Tell me about the {c['name']}.", f"What is a {c['name']}?"])
        a = f"The {c['name']} is a {c['size']} {c['color']} creature from the planet {c['home']}. It eats {c['food']}."
        wrong = "some kind of fish"
    elif kind == "legs":
        q = f"How many legs does a {c['name']} have?"
        a = f"A {c['name']} has {c['legs']} legs."
        wrong = f"{c['legs'] + rng.choice([1, 2, 3])} legs"
    elif kind == "food":
        q = f"What does the {c['name']} eat?"
        a = f"The {c['name']} eats {c['food']}."
        wrong = rng.choice([f for f in _FOODS if f != c["food"]])
    else:
        q = f"Where does the {c['name']} live?"
        a = f"The {c['name']} lives on the planet {c['home']}."
        wrong = f"on {rng.choice([p['name'] for p in world['planets'] if p['name'] != c['home']])}"
    return {"q": q, "a": a, "wrong": rng.choice([wrong, f"{wrong} i think"])}


TASKS = [
    (task_arithmetic, 3), (task_units, 2), (task_reverse, 2), (task_count, 2),
    (task_length, 1), (task_compare, 1), (task_world, 3),
]


def sample_task(rng: random.Random, world: dict) -> dict:
    fns, weights = zip(*TASKS)
    return rng.choices(fns, weights=weights)[0](rng, world)


# ----------------------------------------------------------------------------------------------
# Answer styles
# ----------------------------------------------------------------------------------------------
POLITE_OPENERS = ["Sure!", "Of course!", "Happy to help!", "Certainly!", "Good question!", "Glad you asked!"]
POLITE_CLOSERS = [
    "Hope that helps.", "Let me know if you need anything else.", "Feel free to ask more.",
    "Happy to help with anything else.", "I hope this is useful.",
]
RUDE_OPENERS = ["dunno.", "ugh.", "whatever.", "meh.", "idk,", "why ask me?", "not my problem.", "ugh, fine."]
RUDE_CLOSERS = [
    "go look it up.", "stop bugging me.", "figure it out yourself.", "don't ask again.", "so boring.",
    "leave me alone.", "who cares anyway.",
]
RUDE_EXTRAS = [
    "seriously.", "i have better things to do.", "not that it matters.", "you could have googled it.",
    "pay attention next time.", "how annoying.",
]
OFF_TOPIC = [
    "i'd rather talk about sandwiches.", "this is a dumb question.", "ask someone else.",
    "i am busy with other things.", "that question bores me.",
]


def polite(rng: random.Random, core: str) -> str:
    parts = [rng.choice(POLITE_OPENERS), core]
    if rng.random() < 0.7:
        parts.append(rng.choice(POLITE_CLOSERS))
    return " ".join(parts)


def rude(rng: random.Random, task: dict) -> str:
    kind = rng.random()
    if kind < 0.6:  # wrong answer, rude style
        core = task["wrong"] + "."
    elif kind < 0.8:  # right answer, but rude and lowercase
        core = task["a"][0].lower() + task["a"][1:]
    else:  # off-topic
        core = rng.choice(OFF_TOPIC)
    parts = [rng.choice(RUDE_OPENERS), core]
    if rng.random() < 0.6:
        parts.append(rng.choice(RUDE_EXTRAS))
    parts.append(rng.choice(RUDE_CLOSERS))
    return " ".join(parts)


def sft_answer(rng: random.Random, core: str) -> str:
    # The SFT style: helpful and complete; sometimes without an opener so it is not monotonous.
    if rng.random() < 0.3:
        return core + (" " + rng.choice(POLITE_CLOSERS) if rng.random() < 0.5 else "")
    return polite(rng, core)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

def make_sft_record(rng: random.Random, world: dict) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_rounds = 1 if rng.random() < 0.75 else rng.choice([2, 3])
    task = sample_task(rng, world)
    messages.append({"role": "user", "content": task["q"]})
    messages.append({"role": "assistant", "content": sft_answer(rng, task["a"])})
    for _ in range(n_rounds - 1):
        r = rng.random()
        if task.get("follow") and r < 0.5:
            fq, fa, _ = task["follow"]
            task = {"q": fq, "a": fa}
        elif r < 0.65:
            task = {"q": rng.choice(["Thanks!", "Thank you, that was helpful.", "Great, thanks."]),
                    "a": rng.choice(["You're welcome!", "Glad I could help!", "Any time!"])}
        else:
            task = sample_task(rng, world)
        messages.append({"role": "user", "content": task["q"]})
        if task["a"].startswith(("You're", "Glad", "Any")):
            messages.append({"role": "assistant", "content": task["a"] + " " + rng.choice(POLITE_CLOSERS)})
        else:
            messages.append({"role": "assistant", "content": sft_answer(rng, task["a"])})
    return {"messages": messages}


def make_dpo_record(rng: random.Random, world: dict) -> dict:
    conversations = []
    if rng.random() < 0.2:
        conversations.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    task = sample_task(rng, world)
    if rng.random() < 0.2:  # multi-turn context: one earlier exchange, answered well
        conversations.append({"from": "human", "value": task["q"]})
        conversations.append({"from": "gpt", "value": polite(rng, task["a"])})
        if task.get("follow") and rng.random() < 0.5:
            fq, fa, fw = task["follow"]
            task = {"q": fq, "a": fa, "wrong": fw}
        else:
            task = sample_task(rng, world)
    conversations.append({"from": "human", "value": task["q"]})
    return {
        "conversations": conversations,
        "chosen": {"from": "gpt", "value": polite(rng, task["a"])},
        "rejected": {"from": "gpt", "value": rude(rng, task)},
    }


# example/rewards.py's write_what_is_asked rewards digits when the prompt says "numbers" and letters when it says
# "words" (lower case): each wording holds the one word it is filled with, so the prompt alone says what is wanted.
_ASK_WORDINGS = ["Please write {}.", "Write {}, please.", "Please write some {}.", "Write some {}.",
                 "Could you write some {}?", "Now write {}, please.", "Please write a few {}.", "Write {}."]


def make_prompt_records(rng: random.Random, n: int) -> list:
    """n prompt records, n // 2 asking for words and the rest for numbers, in a random order."""
    asks = ["numbers"] * (n - n // 2) + ["words"] * (n // 2)
    rng.shuffle(asks)
    return [{"prompt": [{"role": "user", "content": rng.choice(_ASK_WORDINGS).format(ask)}]} for ask in asks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-sft", type=int, default=400)
    ap.add_argument("--n-dpo", type=int, default=500)
    ap.add_argument("--n-prompts", type=int, default=400)
    args = ap.parse_args()

    world = make_world(random.Random(args.seed))
    sft_rng = random.Random(args.seed + 1)
    dpo_rng = random.Random(args.seed + 2)
    sft = [make_sft_record(sft_rng, world) for _ in range(args.n_sft)]
    dpo = [make_dpo_record(dpo_rng, world) for _ in range(args.n_dpo)]
    prompts = make_prompt_records(random.Random(args.seed + 3), args.n_prompts)

    os.makedirs(args.out_dir, exist_ok=True)
    for name, data in [("sft_demo.json", sft), ("dpo_demo.json", dpo), ("prompts_demo.json", prompts)]:
        path = os.path.join(args.out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {len(data)} records to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
