"""asv benchmarks of qnref (benchmarks/) and the claims checker (claims.py); see docs/benchmarks.md."""
