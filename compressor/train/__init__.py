"""Training: datasets (built-in, image folders, python factories, seeded subsets), the fine-tuning loop with its
method hooks, AMP, DDP, checkpoints and resume, and PyTorch evaluation."""
