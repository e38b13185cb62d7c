"""`python -m milo_jax ...` runs the milo-jax command line."""

from milo_jax.cli import main

raise SystemExit(main())
