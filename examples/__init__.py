"""Runnable examples (each is exercised by tests/examples)."""
