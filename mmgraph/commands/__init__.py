"""One module per ``mmgraph`` subcommand: arguments in (from ``mmgraph.cli``), one call out.
No command imports another (tests/test_layering.py)."""
