"""Evaluation stage: metrics, baseline vs fine-tuned, efficiency figures."""
