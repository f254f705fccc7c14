"""The data side of mSFT: ten benchmark converters, mixture folders, prompts, tokenization and the mixture sampler.

Make a mixture folder (OUT/manifest.json and OUT/<task>/{train,selection,test}.jsonl):

    python data.py prepare --source ../shared/data --out mixture          # local DIR/<task>/<split>.jsonl, hub schema
    python data.py prepare --source hub --out mixture --tasks gsm8k sciq  # from the hub (needs `pip install datasets`)

OUT is replaced whole or not at all: written beside it under a temporary name, then renamed into place, so a failed
or killed prepare leaves the old folder as it was. An OUT that holds anything but a mixture folder is refused.

Split policy (per task, deterministic from --seed): every available labelled split is converted; if the hub's own
test split has at least --test rows, our test split is drawn from it alone and its other rows are never used
(official test rows stay out of training); otherwise all splits are pooled and test is cut from the pool first.
Then selection, then train, are cut from the (shuffled) pool. A task with fewer rows than asked gets a smaller
train split, with a warning and a `short` note in the manifest; one that cannot fill every split is an error.
The hub test splits of commonsense_qa, hellaswag, winogrande and medmcqa carry no labels and are skipped.

Training text (the release's, SPEC section 9): `Q: {question}\nA: #### {answer}<eos>`, or for a worked answer
`Q: {question}\nA: {rationale}<eos>` where the rationale ends `#### {answer}`; the prompt is everything up to "A:",
the loss is on the rest (from the " ####" or rationale's first token) and EOS. A question with choices reads
`{question}\noptions: A. x, B. y, ...`. Over-long examples (prompt + target + EOS > max_len tokens) are dropped
from training and counted, never truncated.

Each converter writes its task the way the release's demonstrations show it, into the plain row schema (question,
answer, choices, rationale) that a mixture folder holds and users' own tasks use:
- commonsense_qa, openbookqa, arc_easy, medmcqa, aqua_rat: the question and its lettered choices, answer a letter;
- hellaswag: the context and each ending in double quotes; winogrande: each option followed by a space (the release
  writes `A. {option1} , B. {option2} `);
- aqua_rat: rationale = the dataset's rationale + ` #### {letter}`; gsm8k: the question alone, rationale = the
  dataset's answer field as it is (`...\n#### 1,080`), answer = the number as written after "####";
- sciq: the question alone, answer the correct text (no choices); boolq: the passage, then the question with a "?",
  answer `True` or `False`.
"""
import argparse
import json
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import cli

TASKS = ("commonsense_qa", "openbookqa", "aqua_rat", "gsm8k", "sciq",
         "arc_easy", "hellaswag", "winogrande", "boolq", "medmcqa")
HUB = {  # task -> (hub id, config), SPEC section 7
    "commonsense_qa": ("tau/commonsense_qa", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "aqua_rat": ("deepmind/aqua_rat", "raw"),
    "gsm8k": ("openai/gsm8k", "main"),
    "sciq": ("allenai/sciq", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_debiased"),
    "boolq": ("google/boolq", None),
    "medmcqa": ("openlifescienceai/medmcqa", None),
}
UNLABELLED_TEST = {"commonsense_qa", "hellaswag", "winogrande", "medmcqa"}  # the hub hides these test answers
HUB_SPLITS = ("train", "validation", "test")
SPLITS = ("train", "selection", "test")  # the splits of a mixture folder
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# -----------------------------------------------------------------------------
# one example and how it is written

@dataclass(frozen=True)
class Example:
    question: str
    answer: str                              # a choice letter when there are choices, else the answer text
    choices: tuple[str, ...] | None = None
    rationale: str | None = None             # a worked answer, written as trained: ends "#### {answer}"

    def __post_init__(self):
        # every converter, reader and test builds examples through here, so bad rows fail in one place
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be a non-empty string, got {self.question!r}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"answer must be a non-empty string, got {self.answer!r}")
        if self.rationale is not None and (not isinstance(self.rationale, str) or not self.rationale.strip()):
            raise ValueError(f"rationale must be a non-empty string or absent, got {self.rationale!r}")
        # evaluation reads the answer after the first "####": the trained text must put the gold there
        if self.rationale is not None and (self.rationale.count("####") != 1
                                           or not self.rationale.endswith(f"#### {self.answer}")):
            raise ValueError(f"rationale must end with '#### {self.answer}' (the answer) and hold no other '####', "
                             f"got ...{self.rationale[-60:]!r}")
        if self.choices is not None:
            if (not isinstance(self.choices, tuple) or not 2 <= len(self.choices) <= len(LETTERS)
                    or not all(isinstance(c, str) and c.strip() for c in self.choices)):
                raise ValueError(f"choices must be 2 to 26 non-empty strings, got {self.choices!r}")
            if self.answer not in LETTERS[:len(self.choices)]:
                raise ValueError(f"answer {self.answer!r} is not one of the choice letters "
                                 f"A-{LETTERS[len(self.choices) - 1]}")


def format_prompt(ex: Example) -> str:
    options = ""
    if ex.choices is not None:
        options = "\noptions: " + ", ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
    return f"Q: {ex.question}{options}\nA:"


def format_target(ex: Example) -> str:
    return f" {ex.rationale}" if ex.rationale is not None else f" #### {ex.answer}"


# -----------------------------------------------------------------------------
# reading rows and converting them, one small converter per benchmark

def read_jsonl(path) -> list[dict]:
    """One JSON object per line. Blank lines only at the end, so row i is always line i + 1 in error messages."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{n}: empty line (expected one JSON object per line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _labelled(question, row):
    # commonsense_qa, openbookqa, arc_easy: choices {text, label} + answerKey; arc's labels 1-5 become A-E by position
    text, labels = row["choices"]["text"], row["choices"]["label"]
    if len(text) != len(labels):
        raise ValueError(f"{len(text)} choice texts but {len(labels)} labels")
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return Example(question, LETTERS[labels.index(row["answerKey"])], tuple(text))


def _aqua_rat(row):
    # options look like "A)21"; the letters must run A, B, C... so position and letter agree
    choices = []
    for i, option in enumerate(row["options"]):
        if not option.startswith(f"{LETTERS[i]})"):
            raise ValueError(f"option {i} {option!r} does not start with '{LETTERS[i]})'")
        choices.append(option[2:].strip())
    return Example(row["question"], row["correct"], tuple(choices), f"{row['rationale'].strip()} #### {row['correct']}")


def _gsm8k(row):
    # trained on the answer field as it is, <<...>> annotations and "1,080" commas included; the gold is that number
    if row["answer"].count("####") != 1:
        raise ValueError(f"answer must hold one '#### N' line: {row['answer'][-80:]!r}")
    return Example(row["question"], row["answer"].split("####")[1].strip(), None, row["answer"])


def _sciq(row):
    # the release asks sciq as an open question: no options, the correct answer's text
    return Example(row["question"], row["correct_answer"])


def _position(label, n, first=0):
    # hub labels are ints or digit strings ("0".."3", winogrande "1"/"2"); `first` is the label of the first choice
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if type(label) is not int or label - first not in range(n):
        raise ValueError(f"label {label!r} is outside the {n} choices (numbered from {first})")
    return LETTERS[label - first]


def _hellaswag(row):
    # the release quotes the context and every ending: '"{ctx}"\noptions: A. "{e0}", B. "{e1}", ...'
    return Example(f'"{row["ctx"]}"', _position(row["label"], len(row["endings"])),
                   tuple(f'"{e}"' for e in row["endings"]))


def _winogrande(row):
    # the release writes "A. {option1} , B. {option2} ": a space after each option
    return Example(row["sentence"], _position(row["answer"], 2, first=1), (f"{row['option1']} ", f"{row['option2']} "))


def _medmcqa(row):
    return Example(row["question"], _position(row["cop"], 4), (row["opa"], row["opb"], row["opc"], row["opd"]))


def _boolq(row):
    if not isinstance(row["answer"], bool):
        raise ValueError(f"answer must be true/false, got {row['answer']!r}")
    return Example(f"{row['passage']}\n{row['question']}?", str(row["answer"]))


CONVERTERS = {
    "commonsense_qa": lambda r: _labelled(r["question"], r),
    "openbookqa": lambda r: _labelled(r["question_stem"], r),
    "aqua_rat": _aqua_rat,
    "gsm8k": _gsm8k,
    "sciq": _sciq,
    "arc_easy": lambda r: _labelled(r["question"], r),
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "medmcqa": _medmcqa,
}
assert set(CONVERTERS) == set(TASKS)


def convert(task: str, row: dict) -> Example:
    """A hub row of one of the ten benchmarks (SPEC section 7) -> Example."""
    if task not in CONVERTERS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return CONVERTERS[task](row)


def from_plain(row: dict) -> Example:
    """A row in the plain schema of users' own tasks and of mixture folders: question, answer, choices?, rationale?"""
    extra = set(row) - {"question", "answer", "choices", "rationale", "id"}
    if extra:
        raise ValueError(f"unexpected fields {sorted(extra)}: expected question, answer, choices, rationale (and id)")
    choices = row.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise ValueError(f"choices must be a list of strings, got {choices!r}")
    return Example(row["question"], row["answer"], None if choices is None else tuple(choices), row.get("rationale"))


def _convert_rows(task, rows, where) -> list[Example]:
    # task None = the plain schema; where names the file (or hub split) so errors read where:row
    out = []
    for n, row in enumerate(rows, 1):
        try:
            out.append(from_plain(row) if task is None else convert(task, row))
        except KeyError as e:
            raise ValueError(f"{where}:{n}: missing field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}:{n}: {e}") from None
    return out


# -----------------------------------------------------------------------------
# mixture folders: prepare (hub or local rows -> OUT/<task>/<split>.jsonl + manifest.json) and load

def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name


def _hub_splits(task) -> dict[str, tuple[str, list[dict]]]:
    try:
        import datasets  # optional: only this path needs it
    except ImportError:
        raise ModuleNotFoundError("--source hub needs the `datasets` library: pip install datasets (or pass "
                                  "--source DIR with DIR/<task>/<split>.jsonl rows in the hub's schema)",
                                  name="datasets") from None
    hub_id, config = HUB[task]
    ds = datasets.load_dataset(hub_id, config)
    return {s: (f"{hub_id}[{s}]", [dict(r) for r in ds[s]]) for s in HUB_SPLITS if s in ds}


def _dir_splits(folder: Path) -> dict[str, tuple[str, list[dict]]]:
    unknown = sorted(f.name for f in folder.glob("*.jsonl") if f.stem not in HUB_SPLITS)
    if unknown:
        raise ValueError(f"{folder}: unexpected files {unknown}: expected train.jsonl, validation.jsonl, test.jsonl")
    files = [folder / f"{s}.jsonl" for s in HUB_SPLITS if (folder / f"{s}.jsonl").is_file()]
    if not files:
        raise ValueError(f"{folder}: no train.jsonl, validation.jsonl or test.jsonl")
    splits = {f.stem: (str(f), read_jsonl(f)) for f in files}
    for where, rows in splits.values():
        if not rows:
            raise ValueError(f"{where}: empty split (no rows)")
    return splits


def prepare(source: str, out, tasks=None, n_train=1800, n_selection=200, n_test=500, seed=20) -> dict:
    """Build a mixture folder (policy in the module docstring); returns the manifest."""
    for flag, n in (("--train", n_train), ("--selection", n_selection), ("--test", n_test)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{flag} must be a positive integer, got {n!r}")
    if source == "hub":
        names = list(tasks or TASKS)
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown task {unknown[0]!r} for --source hub: "
                             f"expected one of {', '.join(TASKS)}")
    else:
        root = Path(source).resolve()
        if not root.is_dir():
            raise ValueError(f"--source {source!r}: expected 'hub' or a folder of <task>/<split>.jsonl")
        names = list(tasks) if tasks else sorted(p.name for p in root.iterdir() if p.is_dir())
        missing = [t for t in names if not (root / t).is_dir()]
        if missing:
            raise ValueError(f"--tasks: unknown task {missing[0]!r}: no folder {root / missing[0]}")
        if not names:
            raise ValueError(f"--source {source!r}: no task folders in it")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks: a task is named twice in {names}")
    out = Path(out).resolve()  # resolved: its siblings are where it really is
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not a mixture folder (no manifest.json); prepare replaces "
                         "the folder whole, so give a new one")

    manifest = {"source": source if source == "hub" else str(root), "seed": seed,
                "asked": {"train": n_train, "selection": n_selection, "test": n_test}, "tasks": {}}
    files = {}  # name in the folder -> text, written once every task has converted
    for task in names:
        splits = _hub_splits(task) if source == "hub" else _dir_splits(root / task)
        entry = {"schema": task if task in TASKS else "plain", "sources": [], "skipped": []}
        examples = {}
        for split, (where, rows) in splits.items():
            if split == "test" and task in UNLABELLED_TEST:
                entry["skipped"].append({"source": where, "rows": len(rows),
                                         "why": "the hub's test split has no labels"})
                continue
            examples[split] = _convert_rows(task if task in TASKS else None, rows, where)
            entry["sources"].append({"source": where, "rows": len(rows)})
        total = sum(len(exs) for exs in examples.values())
        # the hub's test rows, when enough, are the test split and nothing else; otherwise everything is one pool
        hub_test = examples.pop("test") if len(examples.get("test", ())) >= n_test else []
        random.Random(f"{seed}:{task}:test").shuffle(hub_test)
        pool = [ex for split in HUB_SPLITS for ex in examples.get(split, ())]
        random.Random(f"{seed}:{task}:pool").shuffle(pool)
        test, pool = (hub_test[:n_test], pool) if hub_test else (pool[:n_test], pool[n_test:])
        entry["test_from"] = "the hub's test split" if hub_test else "the pooled splits"
        parts = {"train": pool[n_selection:n_selection + n_train], "selection": pool[:n_selection], "test": test}
        if len(test) < n_test or len(parts["selection"]) < n_selection or not parts["train"]:
            raise ValueError(f"{task}: only {total} labelled rows: cannot fill test {n_test} + selection "
                             f"{n_selection} + train; pass smaller --test/--selection")
        if len(parts["train"]) < n_train:
            entry["short"] = f"asked for train {n_train}, only {len(parts['train'])} rows left after test and selection"
            warnings.warn(f"{task}: {entry['short']}", stacklevel=2)
        entry["sizes"] = {s: len(parts[s]) for s in SPLITS}
        for split in SPLITS:
            lines = [json.dumps({"question": ex.question, "answer": ex.answer,
                                 "choices": None if ex.choices is None else list(ex.choices),
                                 "rationale": ex.rationale}, ensure_ascii=False) for ex in parts[split]]
            files[f"{task}/{split}.jsonl"] = "".join(line + "\n" for line in lines)
        manifest["tasks"][task] = entry
    files["manifest.json"] = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"

    # the folder is replaced whole or not at all: written under a temporary sibling name, then swapped in by
    # renames. A kill leaves the old folder as it was (or, between the renames, as .old until the next success)
    # and a temporary folder that the next prepare removes first.
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
    except OSError as e:  # a full disk: give back what was written, and name the folder (a failed write names none)
        shutil.rmtree(tmp, ignore_errors=True)
        e.filename = e.filename or str(out)
        raise
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)  # a killed prepare's, whose new folder is already in place
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def load_mixture(folder, tasks=None) -> dict[str, dict[str, list[Example]]]:
    """task -> split -> examples, every row validated against the plain schema and the manifest's sizes."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no manifest.json (make the folder with `python data.py prepare`)")
    manifest = cli.read_json(path)
    try:  # what loading reads of it: each task's split sizes
        sizes = {t: {s: int(entry["sizes"][s]) for s in SPLITS} for t, entry in manifest["tasks"].items()}
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ValueError(f"{path}: not a mixture manifest (expected \"tasks\", each with the \"sizes\" of train, "
                         "selection and test; remake the folder with `python data.py prepare`)") from None
    known = list(sizes)
    for t in tasks or ():
        if t not in known:
            raise ValueError(f"unknown task {t!r}: the mixture {folder} has {', '.join(known)}")
    mixture = {}
    for task in tasks or known:
        mixture[task] = {}
        for split in SPLITS:
            path = folder / task / f"{split}.jsonl"
            exs = _convert_rows(None, read_jsonl(path), path)
            if not exs:
                raise ValueError(f"{path}: empty split (every task needs train, selection and test rows)")
            if len(exs) != sizes[task][split]:
                raise ValueError(f"{path}: {len(exs)} rows but the manifest says {sizes[task][split]}")
            mixture[task][split] = exs
    return mixture


# -----------------------------------------------------------------------------
# tokenization

def load_tokenizer(model_dir) -> tuple[Tokenizer, int]:
    """(tokenizer from tokenizer.json, eos id from config.json eos_token_id or tokenizer_config.json eos_token)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a checkpoint folder needs its tokenizer in hub layout)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception that names no file
        raise ValueError(f"{path}: not a readable tokenizer ({e})") from None
    config = cli.read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None  # several stop ids (llama 3 instruct): the first is the end of text
    if eos is None and (model_dir / "tokenizer_config.json").is_file():
        name = cli.read_json(model_dir / "tokenizer_config.json").get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        eos = tok.token_to_id(name) if isinstance(name, str) else None
    if not isinstance(eos, int) or not 0 <= eos < tok.get_vocab_size():
        raise ValueError(f"{model_dir}: no usable eos id (config.json eos_token_id or tokenizer_config.json eos_token)")
    return tok, eos


def encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    # special tokens on, as HF's tokenizer() does: a BOS where the model's post-processor adds one (evaluation too)
    return [e.ids for e in tok.encode_batch(prompts)]


def encode_examples(tok, eos_id, examples, max_len) -> list[tuple[list[int], list[int]] | None]:
    """Per example (ids, labels with -100 on the prompt), or None when prompt + target + EOS exceed max_len."""
    prompts = encode_prompts(tok, [format_prompt(ex) for ex in examples])
    # the target is encoded apart so the mask boundary is exact; it opens with a space, so BPE splits there anyway
    targets = [e.ids + [eos_id] for e in tok.encode_batch([format_target(ex) for ex in examples],
                                                          add_special_tokens=False)]
    return [(p + t, [-100] * len(p) + t) if len(p) + len(t) <= max_len else None for p, t in zip(prompts, targets)]


def encode_example(tok, eos_id, ex, max_len) -> tuple[list[int], list[int]] | None:
    return encode_examples(tok, eos_id, [ex], max_len)[0]


# -----------------------------------------------------------------------------
# the mixture sampler

class MixtureSampler:
    """Global batches of (task, index) over the active tasks, the same on every rank and at every world size.

    An epoch is one pass over the active examples (the release's): each pass is a fresh seeded permutation of them,
    cut into steps of `batch` examples, the last step of a pass taking only what is left. A new active set, or a
    new set of skipped examples (IES), ends the pass: the next draw starts a pass over the new set.
    Weighted mode (set_weights): each slot of a step picks task i with probability w_i / sum(active w), then the
    next example of that task's own seeded cycle (no repeats within a task until it is used up); a pass is then as
    many draws as there are active examples, so epochs keep their length.
    The random streams are keyed by (seed, pass or step), so the state is a handful of counters: plain JSON.
    """

    def __init__(self, sizes: dict[str, int], batch: int, seed: int):
        if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes.values()):
            raise ValueError(f"sizes must give every task a positive number of examples, got {sizes}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.sizes, self.batch, self.seed = dict(sizes), batch, seed
        self.tasks = sorted(sizes)
        self.active = tuple(self.tasks)
        self.skip: frozenset = frozenset()           # (task, index) left out of the passes (IES)
        self.weights = None
        self.step = 0                                # global batches drawn
        self.pass_index, self.pos = 0, 0             # the current pass, and how many of its examples are drawn
        self.cursors = {t: [0, 0] for t in self.tasks}  # weighted mode: task -> [cycle, position]
        self._perms = {}                             # cache: stream key -> permutation

    def _perm(self, key: tuple, n: int):
        if key not in self._perms:
            # keep one permutation per stream (the pass, or one task's cycle): the newest
            self._perms = {k: v for k, v in self._perms.items() if k[:-1] != key[:-1]}
            self._perms[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._perms[key]

    def items(self) -> list[tuple[str, int]]:
        """The examples one pass goes over, in a fixed order: the active tasks' examples that are not skipped."""
        return [(t, i) for t in self.active for i in range(self.sizes[t]) if (t, i) not in self.skip]

    @property
    def size(self) -> int:
        """Examples in one pass: one epoch of the active mixture."""
        return sum(self.sizes[t] for t in self.active) - sum(t in self.active for t, _ in self.skip)

    def next_size(self) -> int:
        """How many examples the next step takes: a full batch, or what is left of the pass."""
        left = self.size - self.pos
        return min(self.batch, left if left > 0 else self.size)

    def _new_pass(self):
        self.pass_index, self.pos = self.pass_index + 1, 0

    def set_active(self, tasks):
        tasks = tuple(sorted(set(tasks)))
        unknown = [t for t in tasks if t not in self.sizes]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: the sampler has {', '.join(self.tasks)}")
        if tasks != self.active:
            self.active = tasks
            self._new_pass()

    def set_skip(self, items):
        items = frozenset((t, int(i)) for t, i in items)
        bad = [(t, i) for t, i in items if t not in self.sizes or not 0 <= i < self.sizes[t]]
        if bad:
            raise ValueError(f"no example {bad[0]} to skip: the sampler has {self.sizes}")
        if items != self.skip:
            self.skip = items
            self._new_pass()

    def set_weights(self, weights: dict[str, float] | None):
        if weights is not None:
            unknown = [t for t in weights if t not in self.sizes]
            if unknown:
                raise ValueError(f"unknown task {unknown[0]!r} in weights: the sampler has {', '.join(self.tasks)}")
            bad = {t: w for t, w in weights.items()
                   if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
            if bad:
                raise ValueError(f"weights must be finite and >= 0, got {bad}")
            weights = {t: float(w) for t, w in sorted(weights.items())}
        self.weights = weights

    def next_batch(self) -> list[tuple[str, int]]:
        """The next global batch, in sampling order."""
        if not self.size:
            raise ValueError("no active example left to sample from")
        if self.pos >= self.size:
            self._new_pass()
        take = self.next_size()
        if self.weights is None:
            items = self.items()
            perm = self._perm((0, self.pass_index), len(items))
            batch = [items[k] for k in perm[self.pos:self.pos + take]]
        else:
            missing = [t for t in self.active if t not in self.weights]
            if missing:
                raise ValueError(f"active task {missing[0]!r} has no weight (set_weights must cover every active task)")
            w = np.array([self.weights[t] for t in self.active])
            if w.sum() <= 0:
                raise ValueError(f"the active tasks {self.active} all have weight 0")
            picks = np.random.default_rng([self.seed, 1, self.step]).choice(len(w), size=take, p=w / w.sum())
            batch = []
            for k in picks:
                task = self.active[k]
                while True:  # the task's own cycle, passing over skipped examples
                    cycle, pos = self.cursors[task]
                    i = int(self._perm((2, self.tasks.index(task), cycle), self.sizes[task])[pos])
                    self.cursors[task] = [cycle + 1, 0] if pos + 1 == self.sizes[task] else [cycle, pos + 1]
                    if (task, i) not in self.skip:
                        break
                batch.append((task, i))
        self.step += 1
        self.pos += take
        return batch

    def state_dict(self) -> dict:
        return {"sizes": dict(self.sizes), "batch": self.batch, "seed": self.seed, "active": list(self.active),
                "skip": sorted(map(list, self.skip)), "weights": self.weights, "step": self.step,
                "pass_index": self.pass_index, "pos": self.pos,
                "cursors": {t: list(c) for t, c in self.cursors.items()}}

    def load_state_dict(self, d: dict):
        for key in ("sizes", "batch", "seed"):
            if d[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key} {d[key]!r} "
                                 f"but this sampler was built with {getattr(self, key)!r}")
        self.active = tuple(d["active"])
        self.skip = frozenset((t, i) for t, i in d["skip"])
        self.weights = d["weights"]
        self.step, self.pass_index, self.pos = d["step"], d["pass_index"], d["pos"]
        self.cursors = {t: list(c) for t, c in d["cursors"].items()}


# -----------------------------------------------------------------------------
# batching: micro-batches of a length-sorted global batch, then padded tensors

def micro_batches(n: int, world: int, micro: int) -> list[list[range]]:
    """The rows 0..n-1 of one global batch (sorted by length) cut into world x k contiguous micro-batches of at most
    `micro` rows and near-equal sizes, dealt round-robin: [rank] -> its k micro-batches. Every rank gets k (empty
    ones when n < world x k), so every rank runs as many forward and backward passes as the others, as the
    collectives of DDP and FSDP need; similar lengths share a micro-batch, so little is padding."""
    k = max(1, math.ceil(n / (world * micro)))
    bounds = [round(j * n / (world * k)) for j in range(world * k + 1)]
    parts = [range(bounds[j], bounds[j + 1]) for j in range(world * k)]
    return [parts[r::world] for r in range(world)]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets), both (B, T) with T = longest - 1: targets[b, t] is the token after idx[b, :t + 1],
    -100 on prompts and padding (right padding, so causal attention never sees it before a real token)."""
    T = max(len(ids) for ids, _ in encoded) - 1
    idx = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), T), -100, dtype=torch.long)
    for b, (ids, labels) in enumerate(encoded):
        idx[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - 1] = torch.tensor(labels[1:])
    return idx, targets


# -----------------------------------------------------------------------------
# the built-in demo mixture: synthetic tasks that a tiny random model learns, and overfits, at different speeds

EOS = "<|endoftext|>"
DEMO_VOCAB = 320

# the tiny decoder the demo trains (model.ModelConfig kwargs); vocab_size is the demo tokenizer's
DEMO_MODEL = dict(model_type="llama", vocab_size=DEMO_VOCAB, dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                  head_dim=24, hidden_dim=256, max_seq_len=512, tie_embeddings=True)
# train.py's flags for the demo, where the command line leaves the default. shots=0: the tiny model only ever sees
# one question per sequence, and few-shot examples would come from training rows whose tagged labels are shifted
DEMO_ARGS = dict(lr=5e-4, batch_size=16, micro_batch=16, interval=0.25, max_len=64, shots=0, max_new_tokens=8,
                 signal="loss")


# -----------------------------------------------------------------------------
# the rules: each returns (question, choices, index of the correct choice). The choices are fixed per task and
# the answer is read off the question, so a 2-layer model can learn every rule within a few hundred steps.

SYMBOLS = ["a", "b", "c", "d"]
RESIDUES = ["0", "1", "2", "3"]


def _first(rng):
    # easiest: copy the first of five symbols
    s = rng.choices(SYMBOLS, k=5)
    return "first " + " ".join(s), SYMBOLS, SYMBOLS.index(s[0])


def _sum(rng):
    # a combination of two tokens: (x + y) mod 4, with three filler symbols so rows differ
    x, y = rng.randrange(10), rng.randrange(10)
    return f"sum {x} {y} " + "".join(rng.choices("efghijk", k=3)), RESIDUES, (x + y) % 4


def _lookup(word, keys):
    # an arbitrary key -> letter table (fixed by the key list, not by the seed): more keys take longer to learn
    table = {k: random.Random(k).randrange(4) for k in keys}

    def rule(rng):
        k = rng.choice(keys)
        # three filler letters so rows differ and selection/test questions are new
        return f"{word} {k} " + "".join(rng.choices("efghij", k=3)), SYMBOLS, table[k]
    return rule


_key = _lookup("key", [a + b for a in "lmno" for b in "pqrs"])  # 16 keys
_code = _lookup("code", [a + b for a in "tuvwxy" for b in "pqrs"])  # 24 keys


# task -> (rule, training rows, quirk). A fraction `quirk` of each task's rows end with the task's own tag, and in
# the training split only, a tagged row's answer is shifted to the next letter: a consistent error, so the model
# learns it after the rule and from then on gets the tagged selection rows wrong (accuracy falls to about 1 - quirk).
# When a rule is learnt is set by its difficulty and its share of the mixture. Measured (SFT, DEMO_TRAIN, seeds 0/1):
# first peaks at ~2 epochs then falls to ~0.72; key (clean) saturates at ~5-8; code (quirk) plateaus ~0.85 from ~6-9;
# sum (clean) is still rising until ~9.
DEMO_TASKS = {
    "first": (_first, 800, 0.25),
    "key": (_key, 300, 0.0),
    "code": (_code, 300, 0.2),
    "sum": (_sum, 300, 0.0),
}
N_SELECTION, N_TEST = 64, 64
TAGS = "xyzw"  # one tag per task, so each quirk is learnt on its own schedule


def _rows(rule, n, quirk, tag, train, rng, seen):
    rows = []
    while len(rows) < n:
        question, choices, k = rule(rng)
        tagged = rng.random() < quirk
        question += f" {tag}" if tagged else ""
        if question in seen:  # no question repeats within a task, so selection and test never leak from train
            continue
        seen.add(question)
        if tagged and train:
            k = (k + 1) % 4
        rows.append({"question": question, "answer": LETTERS[k], "choices": choices, "rationale": None})
    return rows


def make_demo(out: Path, seed: int = 0) -> Path:
    """Write the demo mixture folder (the layout data.load_mixture reads) with its tokenizer in OUT/tokenizer."""
    out = Path(out)
    manifest = {"source": "demo", "seed": seed, "asked": {"train": None, "selection": N_SELECTION, "test": N_TEST},
                "tasks": {}}
    texts = []
    for tag, (task, (rule, n_train, quirk)) in zip(TAGS, DEMO_TASKS.items()):
        rng, seen = random.Random(f"{seed}:{task}"), set()
        # held-out rows first and clean; then the training rows, the tagged ones with shifted labels
        parts = {"selection": _rows(rule, N_SELECTION, quirk, tag, False, rng, seen),
                 "test": _rows(rule, N_TEST, quirk, tag, False, rng, seen),
                 "train": _rows(rule, n_train, quirk, tag, True, rng, seen)}
        (out / task).mkdir(parents=True, exist_ok=True)
        for split, rows in parts.items():
            _write_atomic(out / task / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            texts += [format_prompt(ex) + format_target(ex) for ex in map(from_plain, rows)]  # for the tokenizer
        manifest["tasks"][task] = {"schema": "plain", "quirk": quirk, "quirk_tag": tag,
                                   "sizes": {s: len(parts[s]) for s in ("train", "selection", "test")}}

    # byte-level BPE: every string round-trips exactly through encode/decode, and the vocab stays tiny
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != DEMO_VOCAB:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens, DEMO_MODEL expects {DEMO_VOCAB}")
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "tokenizer" / "tokenizer.json", tok.to_str())
    _write_atomic(out / "tokenizer" / "tokenizer_config.json", json.dumps({"eos_token": EOS}) + "\n")
    # written last: a folder with a manifest is a finished one
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    hub_tasks = "tasks of --source hub (--tasks names them; a local DIR's tasks are its folders):\n" + "".join(
        f"  {t:16s}{hub_id}{f' ({config})' if config else ''}\n" for t, (hub_id, config) in HUB.items())
    parser = argparse.ArgumentParser(description=__doc__, epilog=hub_tasks, formatter_class=cli.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert benchmark rows into OUT/<task>/{train,selection,test}.jsonl",
                       description="Convert benchmark rows into a mixture folder, OUT/<task>/{train,selection,test}"
                       ".jsonl\nand OUT/manifest.json, replacing OUT whole. The split policy: python data.py --help",
                       epilog=hub_tasks, formatter_class=cli.HelpFormatter)
    # where the rows come from and where they go
    p.add_argument("--source", required=True,
                   help="'hub' (needs `pip install datasets`) or DIR with <task>/<split>.jsonl")
    p.add_argument("--out", required=True, help="the mixture folder to write (a new folder, or a mixture to replace)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks to include (default: all ten, or every folder of DIR)")
    # split sizes per task (paper: 1,800 training examples per task)
    p.add_argument("--train", type=cli.number(int, at_least=1), default=1800, help="training examples per task")
    p.add_argument("--selection", type=cli.number(int, at_least=1), default=200,
                   help="selection examples per task (mSFT's scores)")
    p.add_argument("--test", type=cli.number(int, at_least=1), default=500,
                   help="test examples per task (reported numbers)")
    p.add_argument("--seed", type=cli.number(int, at_least=0), default=20, help="seed of every shuffle")
    args = parser.parse_args(argv)
    manifest = prepare(args.source, args.out, args.tasks, args.train, args.selection, args.test, args.seed)
    for task, entry in manifest["tasks"].items():
        sizes = " ".join(f"{s} {n}" for s, n in entry["sizes"].items())
        print(f"{task:16s} {sizes}  (test from {entry['test_from']})")
    print(f"wrote {Path(args.out) / 'manifest.json'}")


if __name__ == "__main__":
    cli.run(main)
