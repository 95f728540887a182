"""Layer 2: :func:`bnguard.recalibrate` and what it stands on (layers, batches, isolation, accumulation
across processes, stopping at a tolerance, the report). Imports the statistics core and torch; never
accelerate, wandb or the hooks."""
