"""Inference optimisation: variants of the fine-tuned model (merged, quantized, pruned, distilled),
each built into RUN_DIR/variants/<name>/, measured on the test split next to the fp32 model, and
offered only when it passes its parity or quality check (see stage.optimize_stage)."""
