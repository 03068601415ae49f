"""``python -m circuitgraph`` is the ``circuitgraph`` command."""

from circuitgraph.cli.main import main

raise SystemExit(main())
