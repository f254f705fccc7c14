"""What the four commands (train.py, evaluate.py, data.py, compare.py) share at the door: flag types that refuse a
bad number when it is parsed, and the one-line error a user or the OS's mistake ends in (a real bug keeps its
traceback).

    p.add_argument("--lr", type=cli.number(float, above=0), default=1e-5)   # "--lr inf" -> argument --lr: ...
    if __name__ == "__main__":
        cli.run(main)                                                          # "error: mix/manifest.json: ..."
"""
import errno
import math
import sys

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
            import argparse
            want = " and ".join(b for b in bounds if b) or "finite"
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} {want}, got {text!r}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def run(main, *args):
    """main(*args), with the errors a user can fix (bad input: ValueError; a missing file, a full disk, a read-only
    folder: OSError) ended by one line on stderr and exit status 2, not a traceback."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        sys.exit("stopped (Ctrl-C)")
    except (ValueError, UnicodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in USER_ERRNOS and not isinstance(e, FileNotFoundError):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
