"""lmforge: one lineage from a raw web page to a served answer."""

__version__ = "0.1.0"
