"""``python -m openinfra`` is the same as the ``openinfra`` console script."""

from openinfra.cli import main

raise SystemExit(main())
