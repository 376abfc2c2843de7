"""python -m securemark.cli: the securemark command line, as the console script runs it."""

from securemark.cli import main

raise SystemExit(main())
