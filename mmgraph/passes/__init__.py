"""Compiler passes over the Program IR (``mmgraph.passes``)."""
