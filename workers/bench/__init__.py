"""Benchmark commands (`omnirouter bench ...`): they print their figures; no test times anything."""
