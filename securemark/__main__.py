"""``python -m securemark``: the command line, as ``securemark`` and ``python -m securemark.cli`` run it."""

from securemark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
