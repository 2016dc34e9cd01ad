"""Sweeps: Ray Tune over Ray Train runs (search space, scheduler, the summary of a sweep)."""
