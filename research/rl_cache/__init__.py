"""Actor/learner RL with a hierarchical parameter cache and a Reverb-style replay table."""
