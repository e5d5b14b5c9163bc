"""Bias and fairness: a data audit, per-group model figures with confidence intervals, counterfactual
and stereotype probes, and threshold post-processing. The training-data mitigations (reweighting,
counterfactual augmentation) and the group lexicon live in data/, where prepare_data applies them."""
