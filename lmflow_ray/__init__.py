"""lmflow-ray: adapt a foundation model end to end on Ray."""

__version__ = "0.1.0"
