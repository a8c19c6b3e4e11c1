"""``python -m fogzo.train --config ... [--key=value ...]``."""

from .cli import main

raise SystemExit(main())
