"""forge: quantize, size and ship LLMs for Hopper and Blackwell GPUs."""

__version__ = "0.1.0"
