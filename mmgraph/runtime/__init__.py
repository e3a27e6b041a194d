"""Execution of lowered programs on CPU/GPU reference kernels (``mmgraph.runtime``)."""
