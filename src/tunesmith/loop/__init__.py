"""The production loop: a challenger retrained on labelled traffic and the rule that promotes it."""
