#!/usr/bin/env python
"""Seeded, deterministic generators for sinkcache's offline long-context task suite.

Every task is a list of JSON records written to ``evals/data/<task>.jsonl``; the same seed always
gives the same bytes (``random.Random(seed)`` only, no numpy/torch, no hash-order dependence).
The docstring perplexity set is the exception that proves the rule: its text comes from the
running Python's standard library, so it is the same bytes for the same Python version (the
version is written into every record).

Documents are ordered so that the first N of a task (lm-eval ``--limit N``) cover its lengths and
needle depths evenly: document ``i`` has length ``LENGTHS[i % len(LENGTHS)]`` and depth
``DEPTHS[i % len(DEPTHS)]`` (lists of coprime sizes, so every 10 or 15 documents cover every
pair). Passkey lists 512 several times and 4096 once, to keep ``--limit 20`` cheap on a CPU.

Lengths are targets in SmolLM2 tokens, met by character counts with a measured characters-per-
token ratio; ``--stats`` reports the real token counts when the smollm2-135m tokenizer is present.

Usage::

    python evals/data/generate.py            # (re)write every task file next to this script
    python evals/data/generate.py --check    # exit 1 if a committed file differs from its generator
    python evals/data/generate.py --stats    # token-length stats per task (needs sinkcache.models)
    python evals/data/generate.py --out DIR --seed-offset 1   # another sample of the same tasks
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Characters per SmolLM2 token of each haystack kind (measured on the generated text).
CHARS_PER_TOKEN = {"noise": 3.75, "prose": 4.6}

# ----------------------------------------------------------------------------------- vocabulary
ADJECTIVES = (
    "amber ancient bitter bold brave bright brisk calm careful cheerful clever cold crimson curious "
    "damp dark deep eager early faint fancy fierce gentle giant glad golden grand green happy heavy "
    "hidden hollow humble icy jolly kind large late lazy little lively lonely loud lucky mellow "
    "merry mighty misty modest narrow noble odd old pale patient plain polite proud quick quiet "
    "rapid rare restless rough round royal rusty sandy scarlet shiny silent silver simple sleepy "
    "slow small smooth soft solid sour steady stormy strange strong sunny swift tall tame tender "
    "thin tidy tiny quaint vast warm wild wise witty young"
).split()
NOUNS = (
    "anchor apple arrow badger bakery banner barrel basket beacon beetle bell bicycle blanket bottle "
    "bridge bucket button cabin camera candle canyon carpet castle cedar chimney cliff clock cloud "
    "comet compass cottage crater curtain desert dolphin dragon drum eagle engine falcon feather "
    "fence fiddle forest fountain garden giraffe glacier hammer harbor helmet island jacket kettle "
    "ladder lantern lemon library lighthouse magnet maple meadow mirror monkey mountain needle "
    "orchard otter paddle parrot pebble pencil piano pillow planet pocket puzzle rabbit raven "
    "ribbon river rocket saddle sailor scarf shovel signal spider spoon squirrel statue teapot "
    "thistle tiger tower trumpet tunnel turtle valley violin wagon walnut whistle window wizard"
).split()
VERBS = (
    "admired borrowed carried cleaned collected crossed described discovered dropped followed "
    "found guarded lifted measured mended moved noticed painted passed polished pulled pushed "
    "repaired sketched studied visited watched wrapped"
).split()
PLACES = (
    "by the river|near the old mill|behind the school|at the market|on the hill|in the garden|"
    "under the bridge|beside the lake|at the station|in the quiet square|along the coast|"
    "near the harbor|in the village|at the edge of the forest|on the main road"
).split("|")
TIMES = (
    "In the morning|After lunch|Every spring|On Sunday|Late at night|During the summer|Before dawn|"
    "Each autumn|Last winter|On most days|Once a year|At noon"
).split("|")
FIRST_NAMES = (
    "Alice Bruno Clara Daniel Elena Felix Grace Hector Irene Jonas Karen Liam Maya Nathan Olga Pablo "
    "Quinn Rosa Samuel Tara Umar Vera Walter Xenia Yusuf Zoe Adrian Bianca Caleb Delia Emil Fiona "
    "Gustav Hana Igor Julia Kevin Lena Marco Nadia Oscar Petra Rafael Sofia Tomas Ursula Victor "
    "Wendy Yara Zane"
).split()
CITIES = (
    "Paris Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Stockholm Helsinki Warsaw Athens "
    "Cairo Nairobi Lagos Tokyo Seoul Beijing Delhi Mumbai Sydney Toronto Chicago Boston Denver "
    "Seattle Lima Bogota Santiago Havana Montreal Istanbul Moscow Budapest Zurich Geneva Amsterdam "
    "Brussels Copenhagen"
).split()
FRUITS = "apple banana cherry mango peach pear plum grape lemon orange kiwi melon papaya apricot fig lime".split()
JOBS = (
    "baker pilot teacher doctor farmer painter plumber lawyer dentist chef nurse gardener "
    "carpenter journalist librarian mechanic musician pharmacist sailor tailor"
).split()
ANIMALS = "cat dog parrot rabbit hamster turtle goldfish horse goat pony ferret lizard canary donkey".split()
INSTRUMENTS = "piano violin guitar flute cello drums trumpet harp clarinet saxophone accordion banjo".split()
COLORS = "red blue green yellow purple orange black white brown pink grey violet".split()

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


# ----------------------------------------------------------------------------------- haystacks
def _sentence(rng: random.Random) -> str:
    form = rng.randrange(4)
    a, b = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    if form == 0:
        return f"The {a} {n1} {rng.choice(VERBS)} the {b} {n2} {rng.choice(PLACES)}."
    if form == 1:
        return f"{rng.choice(TIMES)}, a {a} {n1} was seen {rng.choice(PLACES)}."
    if form == 2:
        return f"Nobody {rng.choice(VERBS)} the {n1} that stood {rng.choice(PLACES)}."
    return f"The {n1} was {a}, and the {n2} was {b}."


def haystack(rng: random.Random, kind: str, tokens: int) -> list[str]:
    """Sentences whose total length is about ``tokens`` SmolLM2 tokens."""
    target = int(tokens * CHARS_PER_TOKEN[kind])
    out: list[str] = []
    size = 0
    while size < target:
        s = NOISE if kind == "noise" else _sentence(rng)
        out.append(s)
        size += len(s) + 1
    return out


def insert(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Join ``sentences`` with each needle inserted at its relative depth (0 = start, 1 = end)."""
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        slots.setdefault(round(depth * len(sentences)), []).append(text)
    parts: list[str] = []
    for i in range(len(sentences) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sentences):
            parts.append(sentences[i])
    return " ".join(parts)


def _grid(i: int, lengths: tuple, depths: tuple) -> tuple:
    return lengths[i % len(lengths)], depths[i % len(depths)]


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in used:
            used.add(k)
            return k


# ----------------------------------------------------------------------------------- tasks
def passkey(seed: int, n: int) -> list[dict]:
    """Classic passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated filler."""
    rng = random.Random(seed)
    # Per 10 documents: 512 x4, 1024 x3, 2048 x2, 4096 x1; depths cycle with period 5.
    lengths = (512, 1024, 2048, 512, 1024, 4096, 512, 1024, 2048, 512)
    depths = (0.1, 0.3, 0.5, 0.7, 0.9)
    docs = []
    for i in range(n):
        length, depth = _grid(i, lengths, depths)
        depth = depths[(i + i // 10) % len(depths)]  # shift each pass so lengths meet new depths
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        body = insert(haystack(rng, "noise", length - 60), [(depth, needle)])
        prompt = (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n"
            f"{body}\n\nWhat is the pass key? The pass key is"
        )
        docs.append({"id": i, "input": prompt, "answer": key, "length": length, "depth": depth})
    return docs


def niah_multikey(seed: int, n: int) -> list[dict]:
    """RULER-style multi-key needle: 4 keyed magic numbers in prose, asked for one of them."""
    rng = random.Random(seed)
    lengths, depths = (512, 768, 1024), (0.1, 0.3, 0.5, 0.7, 0.9)
    docs = []
    for i in range(n):
        length, depth = _grid(i, lengths, depths)
        used: set[str] = set()
        keys = [_key(rng, used) for _ in range(4)]
        values = [str(rng.randint(1000000, 9999999)) for _ in keys]
        # The asked needle sits at the grid depth; distractors anywhere else.
        needles = [(depth, f"One of the special magic numbers for {keys[0]} is: {values[0]}.")]
        needles += [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys[1:], values[1:])]
        body = insert(haystack(rng, "prose", length - 130), needles)
        prompt = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n"
            f"{body}\n\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
            f"The special magic number for {keys[0]} mentioned in the provided text is"
        )
        docs.append({"id": i, "input": prompt, "answer": values[0], "length": length, "depth": depth, "distractors": values[1:]})
    return docs


def kv_retrieval(seed: int, n: int) -> list[dict]:
    """Key-value retrieval (Liu et al. 2023, "Lost in the Middle"): a JSON object of 16 or 24
    ``"adjective-noun": "6-digit number"`` pairs (no word repeats within a document); return the
    value of one key, placed at the grid depth. Chance (any value of the object) is 1/16-1/24.

    (Random hex keys and values, as in the paper, are beyond a 135M model: it retrieves the
    right key but garbles 8 hex characters, about 10% exact.)"""
    rng = random.Random(seed)
    sizes, depths = (16, 24), (0.1, 0.3, 0.5, 0.7, 0.9)
    docs = []
    for i in range(n):
        pairs, depth = _grid(i, sizes, depths)
        keys = [f"{a}-{b}" for a, b in zip(rng.sample(ADJECTIVES, pairs), rng.sample(NOUNS, pairs))]
        values = [str(v) for v in rng.sample(range(100000, 999999), pairs)]
        pos = min(int(depth * pairs), pairs - 1)
        data = "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(keys, values)) + "}"
        prompt = (
            "Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f"JSON data:\n{data}\n\n"
            f'Key: "{keys[pos]}"\nCorresponding value: "'
        )
        docs.append({"id": i, "input": prompt, "answer": values[pos], "pairs": pairs, "depth": depth})
    return docs


def _var(rng: random.Random, used: set[str]) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def variable_tracking(seed: int, n: int) -> list[dict]:
    """RULER-style variable tracking: 4 chains ``VAR A = 12345. VAR B = A. ...`` hidden in noise;
    asked for the value of the last variable of one chain. ``hops`` counts the ``VAR B = A.``
    links to follow (0 = the asked variable holds the number itself); the other 3 chains are
    distractors built the same way, so guessing among the chains' numbers scores 25%."""
    rng = random.Random(seed)
    # Per 6 documents: 0 hops x4, 1 hop x1, 2 hops x1. Measured on SmolLM2-135M (full cache, 30
    # docs): it follows 1 link about 20% of the time and 2 links almost never (it answers another
    # chain's number, also when shown how to write the chain out), so with the earlier mix
    # (0,1,0,2,1,0) the task sat at 40% (limit 20) vs 25% chance; 0-hop lookups succeed ~80%.
    lengths, hops_grid = (512, 768), (0, 1, 0, 0, 2, 0)
    docs = []
    for i in range(n):
        length, hops = _grid(i, lengths, hops_grid)
        used: set[str] = set()
        chains = []
        values = rng.sample(range(10000, 99999), 4)
        for c in range(4):
            names = [_var(rng, used) for _ in range(hops + 1)]
            stmts = [f"VAR {names[0]} = {values[c]}."] + [f"VAR {names[j + 1]} = {names[j]}." for j in range(hops)]
            chains.append((names, stmts))
        # Statements keep chain order; positions are random, increasing within each chain.
        needles = []
        for _, stmts in chains:
            depths = sorted(rng.uniform(0.05, 0.95) for _ in stmts)
            needles += list(zip(depths, stmts))
        body = insert(haystack(rng, "noise", length - 40 - 12 * len(needles)), needles)
        target = chains[0][0][-1]
        prompt = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{body}\n\nQuestion: What is the value of variable {target}?\nAnswer: VAR {target} ="
        )
        docs.append(
            {"id": i, "input": prompt, "answer": str(values[0]), "length": length, "hops": hops, "distractors": [str(v) for v in values[1:]]}
        )
    return docs


def _problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    """Start from 2-9; each step adds or subtracts 1-5 or doubles (results stay positive). The worked
    solution restates each instruction before computing it ("Add 3: 5 + 3 = 8."): SmolLM2-135M
    otherwise misreads the question's numbers far more often than it miscalculates (15% -> 45%)."""
    x = rng.randint(2, 9)
    words, work = [f"Start with {x}."], [f"Start with {x}."]
    for _ in range(steps):
        ops = "+" + ("-" if x > 1 else "") + ("*" if x <= 10 else "")
        op = rng.choice(ops)
        if op == "*":
            k = 2
            words.append("Multiply by 2.")
            y = x * k
        elif op == "+":
            k = rng.randint(1, 5)
            words.append(f"Add {k}.")
            y = x + k
        else:
            k = rng.randint(1, min(5, x - 1))
            words.append(f"Subtract {k}.")
            y = x - k
        work.append(f"{words[-1][:-1]}: {x} {op} {k} = {y}.")  # restating the step helps a 135M model
        x = y
    question = " ".join(words) + " What is the result?"
    solution = " ".join(work) + f" The answer is {x}."
    return question, solution, x


def arithmetic_cot(seed: int, n: int) -> list[dict]:
    """Multi-step arithmetic with chain of thought: 8 worked examples (2-3 steps each), then a new
    problem (2 steps, every third one 3); the model must write the steps and ``The answer is N.``"""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        shots = []
        for _ in range(8):
            q, s, _ = _problem(rng, rng.randint(2, 3))
            shots.append(f"Question: {q}\nAnswer: {s}")
        steps = 3 if i % 3 == 2 else 2
        q, _s, ans = _problem(rng, steps)
        prompt = "\n\n".join(shots) + f"\n\nQuestion: {q}\nAnswer:"
        docs.append({"id": i, "input": prompt, "answer": str(ans), "steps": steps})
    return docs


_FACTS: tuple[tuple[str, tuple[str, ...], str, str, str], ...] = (
    # (attribute, values, statement, question, answer prefix)
    ("city", tuple(CITIES), "{name} lives in {v}.", "In which city does {name} live?", "{name} lives in"),
    ("fruit", tuple(FRUITS), "{name}'s favorite fruit is the {v}.", "What is {name}'s favorite fruit?", "{name}'s favorite fruit is the"),
    ("job", tuple(JOBS), "{name} works as a {v}.", "What does {name} work as?", "{name} works as a"),
    ("pet", tuple(ANIMALS), "{name} has a pet {v}.", "What pet does {name} have?", "{name} has a pet"),
    ("instrument", tuple(INSTRUMENTS), "{name} plays the {v}.", "Which instrument does {name} play?", "{name} plays the"),
    ("color", tuple(COLORS), "{name}'s favorite color is {v}.", "What is {name}'s favorite color?", "{name}'s favorite color is"),
)


def facts_mc(seed: int, n: int) -> list[dict]:
    """Multiple choice over facts stated in a long context: 12 people, one fact each, mixed into
    prose; the question asks one person's fact and the answer restates its start ("Answer: Walter
    lives in"), so each choice is scored as the completion. The 4 choices all occur in the context
    (3 belong to other people), so chance is 25%."""
    rng = random.Random(seed)
    lengths, depths = (512, 768), (0.1, 0.3, 0.5, 0.7, 0.9)
    docs = []
    for i in range(n):
        length, depth = _grid(i, lengths, depths)
        attr, pool, stmt, question, prefix = _FACTS[i % len(_FACTS)]
        people = rng.sample(FIRST_NAMES, 12)
        asked = 0  # people[0]'s fact is the one asked; it sits at the grid depth
        while True:
            values = [rng.choice(pool) for _ in people]
            others = sorted({v for v in values[1:] if v != values[asked]})
            # One right answer (nobody else shares it) and three wrong ones that occur in the text.
            if values.count(values[asked]) == 1 and len(others) >= 3:
                break
        wrong = rng.sample(others, 3)
        choices = wrong + [values[asked]]
        rng.shuffle(choices)
        facts = [stmt.format(name=p, v=v) for p, v in zip(people, values)]
        needles = [(depth, facts[0])] + [(rng.random(), f) for f in facts[1:]]
        body = insert(haystack(rng, "prose", length - 140), needles)
        prompt = (
            "Read the following notes carefully. Afterwards you will answer a question about them.\n\n"
            f"{body}\n\nQuestion: {question.format(name=people[asked])}\nAnswer: {prefix.format(name=people[asked])}"
        )
        docs.append(
            {"id": i, "input": prompt, "choices": choices, "label": choices.index(values[asked]), "attribute": attr, "length": length, "depth": depth}
        )
    return docs


# Held-out natural text: standard-library docstrings. Modules chosen to be present on every
# CPython 3.10+ build (no optional C extensions) and to have substantial docs.
DOC_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions", "functools",
    "getopt", "gettext", "glob", "heapq", "hmac", "inspect", "ipaddress", "json", "locale", "logging",
    "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random",
    "re", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "uuid", "warnings",
    "weakref", "zipfile",
)  # fmt: skip


def _module_text(name: str, max_chars: int) -> str:
    import importlib

    mod = importlib.import_module(name)
    parts = []
    head = inspect.getdoc(mod)
    if head:
        parts.append(head)
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80:
            parts.append(f"{attr}\n{doc}")
    text = ""
    for p in parts:
        if len(text) + len(p) + 2 > max_chars and text:
            break
        text += ("\n\n" if text else "") + p
    return text[:max_chars]


def docstring_ppl(seed: int, n: int) -> list[dict]:
    """Perplexity of standard-library docstrings (about 2,400 characters per module), in a seeded
    module order. Same bytes for the same Python version."""
    rng = random.Random(seed)
    mods = list(DOC_MODULES)
    rng.shuffle(mods)
    docs = []
    py = ".".join(platform.python_version_tuple()[:2])
    for name in mods:
        text = _module_text(name, 2400)
        if len(text) < 1200:
            continue
        docs.append({"id": len(docs), "module": name, "python": py, "text": text})
        if len(docs) == n:
            break
    return docs


class Spec:
    """A task's generator, seed and document count (a plain class: this file is also loaded by
    path, outside any package, where dataclasses cannot resolve their module)."""

    __slots__ = ("fn", "seed", "n")

    def __init__(self, fn: Callable[[int, int], list[dict]], seed: int, n: int) -> None:
        self.fn, self.seed, self.n = fn, seed, n


#: task file name -> (generator, seed, documents). Seeds are fixed; change them only with a
#: new task version.
TASKS: dict[str, Spec] = {
    "passkey": Spec(passkey, 1001, 100),
    "niah_multikey": Spec(niah_multikey, 1002, 100),
    "kv_retrieval": Spec(kv_retrieval, 1003, 100),
    "variable_tracking": Spec(variable_tracking, 1004, 100),
    "arithmetic_cot": Spec(arithmetic_cot, 1005, 100),
    "facts_mc": Spec(facts_mc, 1006, 100),
    "docstring_ppl": Spec(docstring_ppl, 1007, 30),
}


def generate(name: str, seed: int | None = None, n: int | None = None) -> list[dict]:
    spec = TASKS[name]
    return spec.fn(spec.seed if seed is None else seed, spec.n if n is None else n)


def dumps(records: list[dict]) -> bytes:
    """The canonical JSONL bytes of ``records`` (sorted keys, ASCII, one record per line)."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in records).encode("ascii")


def path_for(name: str, out_dir: Path | None = None) -> Path:
    return (out_dir or HERE) / f"{name}.jsonl"


def write(name: str, out_dir: Path | None = None, seed_offset: int = 0) -> Path:
    spec = TASKS[name]
    path = path_for(name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dumps(generate(name, seed=spec.seed + seed_offset))
    tmp = path.with_suffix(f".tmp{id(data)}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def ensure(name: str, out_dir: Path | None = None) -> Path:
    """The task's data file, generated first if it is missing."""
    path = path_for(name, out_dir)
    if not path.is_file():
        write(name, out_dir)
    return path


def check(out_dir: Path | None = None) -> list[str]:
    """Names of task files that differ from what their generator produces now."""
    bad = []
    for name in TASKS:
        path = path_for(name, out_dir)
        if not path.is_file() or path.read_bytes() != dumps(generate(name)):
            bad.append(name)
    return bad


def stats(out_dir: Path | None = None) -> None:
    from sinkcache.models import load_model

    _, tok = load_model("smollm2-135m", progress=False)  # loads the model too; fine for a one-off
    for name in TASKS:
        records = [json.loads(line) for line in path_for(name, out_dir).read_text().splitlines()]
        field = "text" if name == "docstring_ppl" else "input"
        lens = [len(tok(r[field]).input_ids) for r in records]
        digest = hashlib.sha256(path_for(name, out_dir).read_bytes()).hexdigest()[:12]
        print(f"{name:18s} docs={len(lens):3d} tokens min={min(lens):5d} mean={sum(lens) / len(lens):7.0f} max={max(lens):5d} sha256={digest}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: next to this script)")
    ap.add_argument("--seed-offset", type=int, default=0, help="add to every task's seed (a fresh sample)")
    ap.add_argument("--only", nargs="*", choices=sorted(TASKS), help="generate only these tasks")
    ap.add_argument("--check", action="store_true", help="verify the files instead of writing them")
    ap.add_argument("--stats", action="store_true", help="print token-length stats (smollm2 tokenizer)")
    args = ap.parse_args(argv)
    if args.check:
        bad = check(args.out)
        print("all task files match their generators" if not bad else f"differ from generator: {', '.join(bad)}")
        return 1 if bad else 0
    if args.stats:
        stats(args.out)
        return 0
    for name in args.only or TASKS:
        p = write(name, args.out, args.seed_offset)
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
