"""Runnable studies built on kljax's public API: ``python -m experiments.NAME [--quick] --out DIR``."""
