"""Structured pruning: the dependency graph (torch-pruning) and what may be pruned, importance scorers, the MAC
planner and physical removal, round_to resolution, and the registered methods and hosts (prune/methods) that the
training loop calls through fixed hooks."""
