"""The CPU demo: train the reference models on generated tasks (see run.py)."""
