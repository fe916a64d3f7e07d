"""Speed benchmarks of kljax against peers: ``python -m benchmarks.NAME``."""
