"""``python -m peftkit`` (and ``torchrun -m peftkit``): the command line."""

from peftkit.cli.main import main

raise SystemExit(main())
