"""Shared plumbing of the absl entrypoints.

- `--config.a.b=value` dotted overrides are taken out of argv before absl
  parses it (absl cannot declare a flag per config key) and applied to the
  YAML when it loads.
- A `UserError` (or a bad flag) prints one line, `error: ...`, on stderr and
  exits with code 2, with no traceback. Anything else is a bug and keeps its
  traceback (exit code 1).
"""

import sys

from absl import app, flags

from tftransfer.errors import UserError

OVERRIDE_PREFIX = "--config."
_overrides = []


def config_overrides():
    """The `a.b=value` overrides given on the command line, in order."""
    return list(_overrides)


def _parse_flags(argv):
    _overrides.clear()
    rest = []
    for arg in argv:
        if arg.startswith(OVERRIDE_PREFIX):
            _overrides.append(arg[len(OVERRIDE_PREFIX):])
        else:
            rest.append(arg)
    try:
        return flags.FLAGS(rest)
    except SystemExit as e:
        # absl exits 1 after printing --help/--helpfull; asking for help is not a failure.
        if any(a.split("=")[0] in ("--help", "--helpfull", "--helpshort", "-h") for a in rest):
            sys.exit(0)
        raise
    except flags.Error as e:
        print(f"error: {' '.join(str(e).split())} (see --helpfull)", file=sys.stderr)
        sys.exit(2)


def run(main):
    """`absl.app.run(main)` with overrides and the exit-code contract."""

    def guarded(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=_parse_flags)
