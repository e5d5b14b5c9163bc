"""Tasks: how examples become prompts and targets, and how predictions are made."""
