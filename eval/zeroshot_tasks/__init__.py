"""lm-eval task definitions over the local zero-shot data (see local_data.py)."""
