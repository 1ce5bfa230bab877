"""Training: the pretraining loop and what it is made of (data sampling, schedule, checkpoints, plots)."""
