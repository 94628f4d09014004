"""Count the verdicts of the bad-input table (``cases.py``) on the code that ``PYTHONPATH`` picks.

    PYTHONPATH=<checkout> python tests/reliability/survey.py [--timeout 30] [--verbose]

Verdicts, as issue 12 counted them: **clear error** (an exception whose message names the
offending value and the fix; on the command line exit status 2 without a traceback),
**unclear** (any other exception, or a traceback), **silently wrong** (no error, a file of the
world changed, or a config ran the code it named), **endless** (still running after
``--timeout`` seconds). Unlike the test, the exception's type is not judged, so an older
checkout that raised another type with a clear message still counts as clear.
"""

import argparse
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: helpers, reliability.cases

from reliability.cases import CASES, PWNED, Case, CLIExit, World, build_world, world_hash


class _Timeout(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the code swallows it."""


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def verdict(case: Case, world: World, tmp: Path, timeout: int) -> tuple[str, str]:
    """Run ``case`` and return its verdict and the message (or what happened instead)."""
    before = world_hash(world.root)
    signal.alarm(timeout)
    try:
        case.act(world, tmp)
    except _Timeout:
        return "endless", f"still running after {timeout} s"
    except BaseException as error:  # the verdict is about whatever was raised
        signal.alarm(0)
        message = str(error)
        if (tmp / PWNED).exists():
            return "silently wrong", f"raised, but ran the code the config named: {message[:200]}"
        if world_hash(world.root) != before:
            return "silently wrong", f"raised, but changed the world's files: {message[:200]}"
        named = all(name in message for name in case.names) and case.fix in message
        usage = not isinstance(error, CLIExit) or (
            error.code == 2 and "Traceback" not in error.stderr
        )
        kind = "clear error" if named and usage else "unclear"
        return kind, f"{type(error).__name__}: {message.strip()[-300:]}"
    finally:
        signal.alarm(0)
    if world_hash(world.root) != before:
        return "silently wrong", "no error, and the world's files changed"
    return "silently wrong", "no error"


def main() -> None:
    """Build the world, run every case, print the verdict of each and their counts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    base = Path(tempfile.mkdtemp(prefix="survey-"))
    world = build_world(base / "world-0")
    counts: Counter[str] = Counter()
    for index, case in enumerate(CASES):
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            kind, detail = verdict(case, world, Path(tmp), args.timeout)
        counts[kind] += 1
        print(f"{kind:15} {case.id}" + (f"\n                {detail}" if args.verbose else ""))
        if kind in ("silently wrong", "endless"):  # start the next case from good files again
            world = build_world(base / f"world-{index + 1}")
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common()))


if __name__ == "__main__":
    main()
