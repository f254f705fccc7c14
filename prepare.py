"""The ten benchmarks of the paper (docs/protocol.md) into mixture folders: one small converter per benchmark, the
split policy, and the command that writes a folder. Training reads the folder with data.load_mixture, never this.

Make a mixture folder (OUT/manifest.json and OUT/<task>/{train,selection,test}.jsonl):

    python data.py prepare --source DIR --out mixture                     # local DIR/<task>/<split>.jsonl, hub schema
    python data.py prepare --source hub --out mixture --tasks gsm8k sciq  # from the hub (needs `pip install datasets`)

OUT is replaced whole or not at all: written beside it under a temporary name, then renamed into place, so a failed
or killed prepare leaves the old folder as it was. An OUT that holds anything but a mixture folder is refused.

Split policy (per task, deterministic from --seed): every available labelled split is converted; if the hub's own
test split has at least --test rows, our test split is drawn from it alone and its other rows are never used
(official test rows stay out of training); otherwise all splits are pooled and test is cut from the pool first.
Then selection, then train, are cut from the (shuffled) pool. A task with fewer rows than asked gets a smaller
train split, with a warning and a `short` note in the manifest; one that cannot fill every split is an error.
The hub test splits of commonsense_qa, hellaswag, winogrande and medmcqa carry no labels and are skipped.

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
import random
import warnings
from pathlib import Path

import common
from data import LETTERS, SPLITS, Example, examples_from, from_plain, read_jsonl

TASKS = ("commonsense_qa", "openbookqa", "aqua_rat", "gsm8k", "sciq",
         "arc_easy", "hellaswag", "winogrande", "boolq", "medmcqa")
HUB = {  # task -> (hub id, config)
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

# -----------------------------------------------------------------------------
# one small converter per benchmark: a hub row -> Example

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
    """A hub row of one of the ten benchmarks (docs/protocol.md) -> Example."""
    if task not in CONVERTERS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return CONVERTERS[task](row)


def convert_rows(task: str | None, rows, where) -> list[Example]:
    """A benchmark's hub rows (task None: rows in the plain schema, a user's own task) -> Examples; errors name
    `where` and the row."""
    return examples_from(rows, where, from_plain if task is None else lambda r: convert(task, r))


# -----------------------------------------------------------------------------
# a mixture folder: rows from the hub or a local folder, split, written whole

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
            examples[split] = convert_rows(task if task in TASKS else None, rows, where)
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

    # the folder is replaced whole or not at all (common.atomic): a kill or a full disk leaves the old one as it was
    try:
        with common.atomic(out) as tmp:
            for name, text in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(text, encoding="utf-8")
    except OSError as e:  # a full disk: name the folder (a failed write names none)
        e.filename = e.filename or str(out)
        raise
    return manifest


def main(argv=None):
    hub_tasks = "tasks of --source hub (--tasks names them; a local DIR's tasks are its folders):\n" + "".join(
        f"  {t:16s}{hub_id}{f' ({config})' if config else ''}\n" for t, (hub_id, config) in HUB.items())
    parser = argparse.ArgumentParser(description=__doc__, epilog=hub_tasks, formatter_class=common.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert benchmark rows into OUT/<task>/{train,selection,test}.jsonl",
                       description="Convert benchmark rows into a mixture folder, OUT/<task>/{train,selection,test}"
                       ".jsonl\nand OUT/manifest.json, replacing OUT whole. The split policy: python data.py --help",
                       epilog=hub_tasks, formatter_class=common.HelpFormatter)
    # where the rows come from and where they go
    p.add_argument("--source", required=True,
                   help="'hub' (needs `pip install datasets`) or DIR with <task>/<split>.jsonl")
    p.add_argument("--out", required=True, help="the mixture folder to write (a new folder, or a mixture to replace)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks to include (default: all ten, or every folder of DIR)")
    # split sizes per task (paper: 1,800 training examples per task)
    p.add_argument("--train", type=common.number(int, at_least=1), default=1800, help="training examples per task")
    p.add_argument("--selection", type=common.number(int, at_least=1), default=200,
                   help="selection examples per task (mSFT's scores)")
    p.add_argument("--test", type=common.number(int, at_least=1), default=500,
                   help="test examples per task (reported numbers)")
    p.add_argument("--seed", type=common.number(int, at_least=0), default=20, help="seed of every shuffle")
    args = parser.parse_args(argv)
    manifest = prepare(args.source, args.out, args.tasks, args.train, args.selection, args.test, args.seed)
    for task, entry in manifest["tasks"].items():
        sizes = " ".join(f"{s} {n}" for s, n in entry["sizes"].items())
        print(f"{task:16s} {sizes}  (test from {entry['test_from']})")
    print(f"wrote {Path(args.out) / 'manifest.json'}")


if __name__ == "__main__":
    common.run(main)
