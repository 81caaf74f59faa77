"""Accuracy: evaluation suites through lm-eval, the paired-bootstrap statistics, gates, per-question samples, which evaluation gates."""
