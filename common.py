"""What every command shares: the ranks (STYLE rule 7), files written whole or not at all, and the door (flag
types that refuse a bad number when parsed, --help with defaults, JSON read naming the file, one-line errors).

    ddp, rank, local_rank, world, device = common.setup("cuda")   # under torchrun: NCCL on GPUs, gloo on CPUs
    common.print0("only rank 0 prints")
    common.write_text(path, text)                                 # a temporary name, then renamed
    p.add_argument("--lr", type=common.number(float, above=0))    # "--lr inf" -> "argument --lr: expected ..."
    if __name__ == "__main__":
        common.run(main)                                          # a user's mistake: one line, exit status 2
"""
import argparse
import errno
import hashlib
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


# -----------------------------------------------------------------------------
# ranks: every rank reaches every collective; rank 0 alone writes the shared files

def setup(device_flag: str | None = None):
    """(ddp, rank, local_rank, world_size, device); the process group is started once, under torchrun."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, 0 if k != "WORLD_SIZE" else 1))
                               for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device(device_flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return ddp, rank, local_rank, world, device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor(float(x), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()
    return x


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# files: written whole or not at all

@contextmanager
def atomic(path):
    """Yields a temporary path beside `path` to write (a file or a folder); renamed onto `path` when the block ends
    without an error, removed when it does not. A kill or a full disk never leaves half a file under the name, and
    a full disk is one line naming the folder and its free space."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():  # a folder cannot be renamed onto another: swap, then remove the old
            remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)  # also what a kill between the two renames left
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(e.errno, f"no space left on the device ({free / 2**20:.0f} MiB free there): free some space, "
                               "or choose another folder", str(path)) from None
    finally:
        remove(tmp)


def remove(path):
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path, text: str):
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of tensors: their names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def json_digest(obj) -> str:
    obj = json.loads(json.dumps(obj))  # as it reads back: int keys become strings, and sort as strings
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def write_json(path, obj, checked: bool = False):
    """`checked`: with the sha256 of its content, which read_json(checked=True) verifies (a file a run reads back)."""
    write_text(path, json.dumps({**obj, "sha256": json_digest(obj)} if checked else obj, indent=2) + "\n")


def read_json(path, checked: bool = False) -> dict:
    """The JSON object in a file (every JSON file the commands read holds one). Bytes that are not UTF-8, text that
    is not JSON, another value, or (checked) content that is not what was written is a ValueError naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    if checked and d.pop("sha256", None) != json_digest(d):
        raise ValueError(f"{path}: damaged (its content does not match the checksum written with it){CANNOT}")
    return d


CANNOT = ": the run cannot go on from it; put the file back, or start the run again in another --out"


def save_tensors(path, tensors: dict, identity: str):
    """A safetensors file that vouches for itself: its header holds `identity` (what the file is: which run, which
    checkpoint) and the sha256 of its tensors, which load_tensors checks."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={"identity": identity, "sha256": digest(tensors)})
        except SafetensorError as e:  # its I/O errors are not OSErrors: a full disk must still read as one
            if "code: 28" in str(e) or "No space" in str(e):
                raise OSError(errno.ENOSPC, str(e)) from None
            raise


def load_tensors(path, identity: str) -> dict:
    """The tensors of a save_tensors file, refused in one line naming it when it is missing, cut short, damaged, or
    another file than `identity` (a swapped or stale one)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, FileNotFoundError) as e:
        raise ValueError(f"{path}: missing or not a whole safetensors file ({e}){CANNOT}") from None
    if meta.get("identity") != identity:
        raise ValueError(f"{path}: holds {meta.get('identity')!r}, not {identity!r} (a swapped or stale file){CANNOT}")
    if meta.get("sha256") != digest(tensors):
        raise ValueError(f"{path}: damaged (its tensors do not match the checksum written with them){CANNOT}")
    return tensors


# -----------------------------------------------------------------------------
# the door: flags checked when parsed, and the one-line error a user's mistake ends in

def number(kind=int, *, above=None, at_least=None, at_most=None):
    """An argparse type: a finite int or float within the bounds, else argparse's one-line error naming the flag."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise ValueError(text) from None
        ok = math.isfinite(x) and (above is None or x > above) and (at_least is None or x >= at_least) and \
            (at_most is None or x <= at_most)
        if not ok:
            bounds = [f"> {above}" if above is not None else None, f">= {at_least}" if at_least is not None else None,
                      f"<= {at_most}" if at_most is not None else None]
            want = " and ".join(b for b in bounds if b) or "finite"
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} {want}, got {text!r}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def device(text: str) -> str:
    """An argparse type: a device this torch can use ("cpu", "cuda", "cuda:1")."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch sees no CUDA device (a CPU build, or no GPU visible)")
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""

    def _get_help_string(self, action):
        # None is "not given": the help says what that means, so "(default: None)" would only add noise
        return action.help if action.default is None else super()._get_help_string(action)


def given(parser, argv) -> set[str]:
    """The destinations of the flags a command line names, even where it gives the default value."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def retired(parser, replacements: dict[str, str]):
    """Flags that were renamed or removed: each still parses, and is refused with what replaces it."""
    for flag, instead in replacements.items():
        class Refuse(argparse.Action):
            def __call__(self, p, namespace, values, option_string=None, instead=instead):
                p.error(f"{option_string} is gone: {instead}")
        parser.add_argument(flag, nargs="?", action=Refuse, help=argparse.SUPPRESS)


# the OS's answers that are the user's to fix: a full disk, a read-only or forbidden folder, a missing file
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR, errno.EEXIST}


def run(main, *args):
    """main(*args), with the errors a user can fix (a refusal: SystemExit("..."); bad input: ValueError; a missing
    file, a full disk, a read-only folder: OSError; a library not installed: ModuleNotFoundError) ended by one line
    on stderr, "error: ...", and exit status 2, not a traceback."""
    try:
        return main(*args)
    except SystemExit as e:  # the commands' own refusals: one line too
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("stopped (Ctrl-C)")
    except (ValueError, UnicodeError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in USER_ERRNOS and not isinstance(e, FileNotFoundError):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
