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
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# ranks: every rank reaches every collective; rank 0 alone writes the shared files

def setup(device_flag: str | None = None):
    """(ddp, rank, local_rank, world_size, device); the process group is started once, under torchrun."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    kind = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
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
    without an error, removed when it does not. A kill or a full disk never leaves half a file under the name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")  # a folder cannot be renamed onto another: swap, then remove
        if tmp.is_dir() and path.exists():
            remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)  # also what a kill between the two renames left
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


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path) -> dict:
    """The JSON object in a file (every JSON file the commands read holds one). Bytes that are not UTF-8, text that
    is not JSON, or another value is a ValueError naming the file: json's own errors name none."""
    path = Path(path)
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""

    def _get_help_string(self, action):
        # None is "not given": the help says what that means, so "(default: None)" would only add noise
        return action.help if action.default is None else super()._get_help_string(action)


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
    """main(*args), with the errors a user can fix (bad input: ValueError; a missing file, a full disk, a read-only
    folder: OSError; a library not installed: ModuleNotFoundError) ended by one line on stderr and exit status 2, not
    a traceback."""
    try:
        return main(*args)
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
