"""Data stage: read, validate and split datasets; every problem names file:line."""
