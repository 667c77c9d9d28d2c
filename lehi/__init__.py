"""lehi: the reproducible benchmark suite for the LEHI optimizer (arXiv 2605.06945)."""

__version__ = "0.1.0"
