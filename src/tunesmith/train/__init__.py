"""Training stage: methods, batching, loss, the training loop."""
