"""Model resolution: catalog names, Hugging Face ids, local checkpoints and GGUF files."""
