"""Report stage: a self-contained HTML report with plots, and a model card."""
