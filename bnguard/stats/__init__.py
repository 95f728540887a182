"""Layer 1, the statistics core: pooled moments, the spread between batches, confidence quantiles. Pure
arithmetic on torch tensors; imports neither accelerate nor wandb."""
