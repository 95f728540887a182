"""``python -m bnguard`` (and ``torchrun -m bnguard``): the command line."""

from .cli import main

raise SystemExit(main())
