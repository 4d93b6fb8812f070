"""Calibration data: training text -> packed token blocks (`load_calibration`), and its provenance."""

from .calibration import describe_dataset, load_calibration, pack_blocks, select_blocks, tokenize_units

__all__ = ["describe_dataset", "load_calibration", "pack_blocks", "select_blocks", "tokenize_units"]
