"""Training: the Ray Train V2 distillation job.

In the order the data flows: ``checks`` (the config, before Ray starts), ``plan`` (streams, step
count, paths), ``driver`` (the trainer and the MLflow run), ``worker`` (one Ray Train worker),
``trainee`` (its models and optimizer, fresh or from a checkpoint), ``step`` (one optimizer step),
``held_out`` (in-training evaluation), ``progress`` (step lines), ``checkpointing`` and
``schedule``; ``distributed`` holds the device, precision and cross-worker helpers.
"""
