"""Layer 1, the statistics core: the pooled statistics of batches and their spread, confidence quantiles. Pure
arithmetic on torch tensors; imports neither accelerate nor wandb."""
