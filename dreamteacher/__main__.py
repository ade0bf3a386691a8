"""``python -m dreamteacher``."""

from .cli import main

raise SystemExit(main())
