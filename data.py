"""The data side of training: the row schema, the training text, mixture folders, tokenization, the mixture
sampler and batching. (The ten benchmarks' converters and `prepare` are in prepare.py; the demo's mixture in demo.py.)

    python data.py prepare --source DIR --out mix     # a mixture folder from DIR/<task>/<split>.jsonl (or --source hub)
    mixture = data.load_mixture("mix")                           # task -> split -> [Example]

A row (a mixture folder's, or a user's own task's): {"question", "answer", "choices"?, "rationale"?}. Training text
(the authors' release's, docs/protocol.md): `Q: {question}\nA: #### {answer}<eos>`, or for a worked answer
`Q: {question}\nA: {rationale}<eos>` where the rationale ends `#### {answer}`; the prompt is everything up to "A:",
the loss is on the rest (from the " ####" or rationale's first token) and EOS. A question with choices reads
`{question}\noptions: A. x, B. y, ...`. Over-long examples (prompt + target + EOS > max_len tokens) are dropped
from training and counted, never truncated.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import common

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
        for text in (self.question, self.answer, self.rationale, *(self.choices or ())):
            if isinstance(text, str):
                text.encode("utf-8")  # a lone surrogate (JSON can hold one) fails here, not when written or tokenized
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
# rows: read, checked, and as a mixture folder holds them

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


def from_plain(row: dict) -> Example:
    """A row in the plain schema of users' own tasks and of mixture folders: question, answer, choices?, rationale?"""
    extra = set(row) - {"question", "answer", "choices", "rationale", "id"}
    if extra:
        raise ValueError(f"unexpected fields {sorted(extra)}: expected question, answer, choices, rationale (and id)")
    choices = row.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise ValueError(f"choices must be a list of strings, got {choices!r}")
    return Example(row["question"], row["answer"], None if choices is None else tuple(choices), row.get("rationale"))


def examples_from(rows, where, convert=None) -> list[Example]:
    """Rows -> Examples through `convert` (default: from_plain); an error names `where` (a file, a hub split) and
    the row, as where:row."""
    out = []
    for n, row in enumerate(rows, 1):
        try:
            out.append((convert or from_plain)(row))
        except KeyError as e:
            raise ValueError(f"{where}:{n}: missing field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}:{n}: {e}") from None
    return out


def load_mixture(folder, tasks=None) -> dict[str, dict[str, list[Example]]]:
    """task -> split -> examples, every row validated against the plain schema and the manifest's sizes."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no manifest.json (make the folder with `python data.py prepare`)")
    manifest = common.read_json(path)
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
            exs = examples_from(read_jsonl(path), path)
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
    config = common.read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None  # several stop ids (llama 3 instruct): the first is the end of text
    if eos is None and (model_dir / "tokenizer_config.json").is_file():
        name = common.read_json(model_dir / "tokenizer_config.json").get("eos_token")
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


def encode_mixture(tok, eos_id, mixture, max_len: int, where) -> tuple[dict, dict]:
    """Every task's training examples encoded once: ({task: [(ids, labels)]}, {task: how many were too long})."""
    enc, dropped = {}, {}
    for t in sorted(mixture):
        both = encode_examples(tok, eos_id, mixture[t]["train"], max_len)
        enc[t] = [e for e in both if e is not None]
        dropped[t] = len(both) - len(enc[t])
        if not enc[t]:
            raise ValueError(f"{where}/{t}: every training example is longer than --max-len {max_len}")
    return enc, dropped


def check_interval(sizes: dict[str, int], interval: float, batch_size: int, alone: bool):
    """Refuse an --interval shorter than one --batch-size of the smallest mixture trained (one task, when `alone`)."""
    task = min(sizes, key=sizes.get) if alone else None
    n = sizes[task] if alone else sum(sizes.values())
    if interval * n < batch_size:
        what = f"task {task} alone ({n} training examples)" if alone else f"the mixture ({n} training examples)"
        raise SystemExit(f"--interval {interval} of {what} is {interval * n:g} examples, less than one --batch-size "
                         f"{batch_size}: use --batch-size {max(1, math.floor(interval * n))} or less, or --interval "
                         f"{batch_size / n:.3g} or more")


def check_vocabulary(tok, vocab_size: int, model_dir):
    """The tokenizer must be the model's: a token id past the embedding would fail mid-run, and a much smaller
    tokenizer is another model's (its ids mean other words)."""
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}")
    if n < 0.99 * vocab_size:  # checkpoints pad their vocabulary a little (Qwen2.5 0.18%, OLMo 2 0.07%), no more
        raise ValueError(f"{model_dir}: the tokenizer has {n} tokens, the model's vocabulary {vocab_size}: not this "
                         "model's tokenizer")


# -----------------------------------------------------------------------------
# the mixture sampler

class MixtureSampler:
    """Global batches of (task, index) over the active tasks, the same on every rank and at every world size.

    An epoch is one pass over the active examples (the release's): each pass is a fresh seeded permutation of them,
    cut into steps of `batch` examples, the last step of a pass taking only what is left. A new active set ends the
    pass: the next draw starts a pass over the new set. The random streams are keyed by (seed, pass), so the state
    is a handful of counters: plain JSON. (baselines.py's sampler adds skipped examples and task weights.)
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
        self.step = 0                                # global batches drawn
        self.pass_index, self.pos = 0, 0             # the current pass, and how many of its examples are drawn
        self._perms = {}                             # cache: stream key -> permutation

    def _perm(self, key: tuple, n: int):
        if key not in self._perms:
            # keep one permutation per stream (the pass, or one task's cycle): the newest
            self._perms = {k: v for k, v in self._perms.items() if k[:-1] != key[:-1]}
            self._perms[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._perms[key]

    def items(self) -> list[tuple[str, int]]:
        """The examples one pass goes over, in a fixed order."""
        return [(t, i) for t in self.active for i in range(self.sizes[t])]

    @property
    def size(self) -> int:
        """Examples in one pass: one epoch of the active mixture."""
        return sum(self.sizes[t] for t in self.active)

    def next_size(self) -> int:
        """How many examples the next step takes: a full batch, or what is left of the pass."""
        left = self.size - self.pos
        return min(self.batch, left if left > 0 else self.size)

    def new_pass(self):
        self.pass_index, self.pos = self.pass_index + 1, 0

    def set_active(self, tasks):
        tasks = tuple(sorted(set(tasks)))
        unknown = [t for t in tasks if t not in self.sizes]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: the sampler has {', '.join(self.tasks)}")
        if tasks != self.active:
            self.active = tasks
            self.new_pass()

    def draw(self, take: int) -> list[tuple[str, int]]:
        items = self.items()
        return [items[k] for k in self._perm((0, self.pass_index), len(items))[self.pos:self.pos + take]]

    def next_batch(self) -> list[tuple[str, int]]:
        """The next global batch, in sampling order."""
        if not self.size:
            raise ValueError("no active example left to sample from")
        if self.pos >= self.size:
            self.new_pass()
        take = self.next_size()
        batch = self.draw(take)
        self.step += 1
        self.pos += take
        return batch

    def state_dict(self) -> dict:
        return {"sizes": dict(self.sizes), "batch": self.batch, "seed": self.seed, "active": list(self.active),
                "step": self.step, "pass_index": self.pass_index, "pos": self.pos}

    def load_state_dict(self, d: dict):
        for key in ("sizes", "batch", "seed"):
            if d[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key} {d[key]!r} "
                                 f"but this sampler was built with {getattr(self, key)!r}")
        self.active = tuple(d["active"])
        self.step, self.pass_index, self.pos = d["step"], d["pass_index"], d["pos"]


# -----------------------------------------------------------------------------
# batching: one step's examples into each rank's forward passes, packed (the default) or padded

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
    idx = torch.tensor([ids[:-1] + [pad_id] * (T + 1 - len(ids)) for ids, _ in encoded])
    targets = torch.tensor([labels[1:] + [-100] * (T + 1 - len(labels)) for _, labels in encoded])
    return idx, targets


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into rows of at most `capacity` tokens: first fit, the longest first (nearly full rows)."""
    rows, room = [], []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, free in enumerate(room) if lengths[j] <= free), len(rows))
        if r == len(rows):  # no row has room: a new one
            rows.append([])
            room.append(capacity)
        rows[r].append(j)
        room[r] -= lengths[j]
    return rows


def collate_packed(encoded, rows: list[list[int]], pad_id: int):
    """(idx, targets, pos, docs), each (R, L): row r holds the examples encoded[j] for j in rows[r] one after the
    other, positions restarting at 0 for each, docs[r, t] = j (-1 on padding), so that the model confines each
    example's attention to itself and sums the loss by example (model.Transformer.forward)."""
    L = max(sum(len(encoded[j][0]) - 1 for j in row) for row in rows)
    idx, pos = torch.full((len(rows), L), pad_id), torch.zeros(len(rows), L, dtype=torch.long)
    targets, docs = torch.full((len(rows), L), -100), torch.full((len(rows), L), -1)
    for r, row in enumerate(rows):
        at = 0
        for j in row:
            ids, labels = encoded[j]
            n = len(ids) - 1
            idx[r, at:at + n], targets[r, at:at + n] = torch.tensor(ids[:-1]), torch.tensor(labels[1:])
            pos[r, at:at + n], docs[r, at:at + n] = torch.arange(n), j
            at += n
    return idx, targets, pos, docs


def forward_passes(encoded, rank: int, world: int, micro: int, pad_id: int, packed: bool = True) -> list[tuple]:
    """This rank's forward passes over one step's examples: [(the examples' indices, tensors)]. Padded (the
    release's micro-batches): the examples sorted by length, at most `micro` a pass, each padded to its longest:
    (idx, targets, None, None). Packed: the examples into rows as long as the step's longest, at most `micro` rows a
    pass: (idx, targets, pos, docs); taken when it runs at least a tenth fewer positions (a packed row attends across
    its whole length, a few percent more work a position: docs/scaling.md), the same choice on every rank. Every
    rank gets as many passes (micro_batches); one with no example left runs encoded[0] (weigh it 0), as DDP needs."""
    lengths = [len(ids) - 1 for ids, _ in encoded]
    order = sorted(range(len(encoded)), key=lambda j: lengths[j])
    plan = [[[order[j] for j in part] for part in parts] for parts in micro_batches(len(encoded), world, micro)]
    if packed:
        rows = pack(lengths, max(lengths))
        rows_plan = [[[rows[r] for r in part] for part in parts] for parts in micro_batches(len(rows), world, micro)]
        size = lambda plan, n: sum(len(p) * max(map(n, p)) for parts in plan for p in parts if p)  # positions run
        if 10 * size(rows_plan, lambda row: sum(lengths[j] for j in row)) <= 9 * size(plan, lengths.__getitem__):
            return [([j for row in part for j in row], collate_packed(encoded, part or [[0]], pad_id))
                    for part in rows_plan[rank]]
    return [(part, (*collate([encoded[j] for j in part or [0]], pad_id), None, None)) for part in plan[rank]]


if __name__ == "__main__":  # python data.py prepare ...: the benchmarks' converters live in prepare.py
    import prepare
    common.run(prepare.main)
