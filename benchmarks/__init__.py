"""procksm's benchmarks: the ``harness`` package and the scripts over it (README.md)."""
