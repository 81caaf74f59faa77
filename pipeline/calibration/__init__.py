"""Calibration sets: materializing a named set (HF datasets or the generated English set)."""
