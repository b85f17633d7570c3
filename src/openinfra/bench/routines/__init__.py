"""Benchmark routines, one module per component; each registers itself with ``@routine``."""
