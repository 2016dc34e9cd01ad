"""Sweeps: Ray Tune over Ray Train runs, in the order a sweep runs.

search_space (what is swept) -> tune (checks, searcher, scheduler, run_sweep) -> plan (the plan,
each trial's config, data prepared once) -> trial (the driver function inside each trial) ->
summary (rows, best trial, tables, plot, best config, MLflow summary run); metrics names what a
trial reports."""
