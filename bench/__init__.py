"""RoleMesh benchmark suite: ``bash bench/run.sh`` (see docs/benchmarks.md)."""
