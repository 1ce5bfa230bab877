"""Reinforcement learning with verifiable rewards: tasks, reward functions, best-of-n sampling and GRPO."""
