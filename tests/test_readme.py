"""The commands README.md and README_zh.md show, taken in the order a reader runs them in a fresh clone (and those of
the pages under docs/): every `python train.py` command's config file exists and loads with its overrides, and no
README command starts a run in a run folder that an earlier one already filled (the second run would be refused)
unless it says resume=... or overwrite=true. Configs are only loaded: nothing is trained, no model is read."""
import glob
import os
import re
import shlex
import unicodedata

import pytest
from conftest import ROOT

try:
    from config import load_config
except ImportError:  # before the config moved out of utils.py
    from utils import load_config

READMES = ("README.md", "README_zh.md")
DOCS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
PLACEHOLDERS = {"config.yml", "my.yml"}  # stand for the reader's own config file: nothing to load


def train_commands(path):
    """(config, overrides, world size or None, the line) of every train.py command in the file's ```bash blocks, in
    order. `python train.py ARGS` and `torchrun OPTIONS train.py ARGS` (its world size: nnodes x nproc_per_node);
    lines that use shell variables (a SLURM script) are left out."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            line = shlex.join(args)  # without its comment
            if "$" in line or "train.py" not in args or args[0] not in ("python", "torchrun"):
                continue
            launcher, args = args[:args.index("train.py")], args[args.index("train.py") + 1:]
            world = None
            if launcher[0] == "torchrun":
                opts = dict(zip(launcher[1::2], launcher[2::2]))
                world = int(opts.get("--nnodes", 1)) * int(opts.get("--nproc_per_node", 1))
            files = [a for a in args if not a.startswith("-") and "=" not in a]
            assert len(files) == 1, f"{path}: one config file per command: {line}"
            overrides = [a for a in args if a not in files and a != "--overrides"]
            commands.append((files[0], overrides, world, line))
    return commands


def load(command, monkeypatch):
    config, overrides, world, line = command
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    assert os.path.isfile(config), f"{line}: no such config file {config}"
    return load_config(config, overrides)


@pytest.mark.parametrize("readme", READMES)
def test_readme_commands_load_and_run_in_order(readme, monkeypatch):
    monkeypatch.chdir(ROOT)  # a fresh clone: relative paths (configs, data, ./outputs) from the repository root
    commands = [c for c in train_commands(readme) if c[0] not in PLACEHOLDERS]
    assert len(commands) >= 4, f"{readme}: its train.py commands were not found"
    filled = {}  # run folder -> the command that started a run there
    for command in commands:
        cfg = load(command, monkeypatch)
        run_dir, line = os.path.abspath(cfg.output_dirs), command[3]
        if cfg.resume is None and not cfg.overwrite:
            assert run_dir not in filled, (f"{readme}: `{line}` would be refused: its run folder {run_dir} already "
                                           f"holds the run of `{filled[run_dir]}` (give it its own exp_name)")
        filled.setdefault(run_dir, line)


def test_readmes_show_the_same_commands():
    assert [c[:3] for c in train_commands("README.md")] == [c[:3] for c in train_commands("README_zh.md")]


@pytest.mark.parametrize("page", DOCS)
def test_docs_commands_load(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    for command in train_commands(page):
        if command[0] not in PLACEHOLDERS:
            load(command, monkeypatch)


def test_docs_pages_are_in_both_languages():
    english = {p for p in DOCS if not p.startswith(os.path.join("docs", "zh"))}
    chinese = {p.replace(os.path.join("docs", "zh"), "docs", 1) for p in DOCS if p.startswith(os.path.join("docs", "zh"))}
    assert english == chinese
    for page in english:
        zh = page.replace("docs", os.path.join("docs", "zh"), 1)
        assert [c[:3] for c in train_commands(page)] == [c[:3] for c in train_commands(zh)], page


def anchors(path):
    """The anchors GitHub gives the headings of a markdown file: lower case, punctuation dropped, spaces as '-',
    '-1', '-2', ... for repeats."""
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    seen, found = {}, set()
    for heading in re.findall(r"^#+ +(.+?) *$", text, re.M):
        heading = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).lower()
        slug = "".join(c for c in heading if c in " -_" or unicodedata.category(c)[0] in "LMN").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", list(READMES) + DOCS)
def test_links_resolve(page):
    """Every relative link of the READMEs and docs pages names a file that exists, and an anchor that it has."""
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page), encoding="utf-8").read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https://..., mailto:
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else os.path.join(ROOT, page)
        assert os.path.exists(path), f"{page}: link to a missing file: {target}"
        if anchor:
            assert anchor in anchors(path), f"{page}: {target}: no such heading in {os.path.relpath(path, ROOT)}"
