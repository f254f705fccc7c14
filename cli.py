"""What the four commands (train.py, evaluate.py, data.py, compare.py) share at the door: flag types that refuse a
bad number when it is parsed, a --help that shows the defaults, JSON files read with errors that name them, and the
one-line error a user or the OS's mistake ends in (a real bug keeps its traceback).

    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--lr", type=cli.number(float, above=0), default=1e-5)   # "--lr inf" -> argument --lr: ...
    config = cli.read_json(folder / "config.json")                         # "folder/config.json: not valid JSON ..."
    if __name__ == "__main__":
        cli.run(main)                                                          # "error: mix/manifest.json: ..."
"""
import argparse
import errno
import json
import math
import sys
from pathlib import Path

# the OS's answers that are the user's to fix: a full disk, a read-only or forbidden folder, a missing file
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR, errno.EEXIST}


def number(kind=int, *, above=None, at_least=None, at_most=None):
    """An argparse type: a finite int or float within the bounds, else argparse's one-line error naming the flag."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise ValueError(text) from None
        bounds = [f"> {above}" if above is not None else None, f">= {at_least}" if at_least is not None else None,
                  f"<= {at_most}" if at_most is not None else None]
        ok = math.isfinite(x) and (above is None or x > above) and (at_least is None or x >= at_least) and \
            (at_most is None or x <= at_most)
        if not ok:
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
