"""Objective: the distillation loss (relation KL, attention map, logit KL, next-token) and the side
stream it may run on."""
