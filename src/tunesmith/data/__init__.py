"""Data stage: read, validate, curate, mitigate and split datasets; every problem names file:line."""
