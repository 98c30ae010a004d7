"""`python -m peftlite ...` runs the command line (also what `accelerate launch -m peftlite` starts)."""

from .app.cli import main

raise SystemExit(main())
