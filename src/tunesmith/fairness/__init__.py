"""Bias and fairness: groups (columns or identity terms found in text), a data audit, per-group
model figures with confidence intervals, counterfactual and stereotype probes, and mitigations
(reweighting, counterfactual augmentation, threshold post-processing)."""
