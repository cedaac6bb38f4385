"""lmflow-ray: adapt a foundation model end to end on Ray."""

from lmflow_ray import lazy_imports

__version__ = "0.1.0"
lazy_imports.install()
