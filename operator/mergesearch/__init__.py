"""MergeSearch: CMA-ES search over linear merges of LLM checkpoints."""
