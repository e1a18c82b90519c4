"""``python -m nstap``."""

from .cli import main

raise SystemExit(main())
