"""The trial program: fetch checkpoints, merge them linearly, evaluate the merge."""
