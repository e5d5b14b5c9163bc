"""tunesmith: an objective-driven fine-tuning workbench."""

__version__ = "0.1.0"
