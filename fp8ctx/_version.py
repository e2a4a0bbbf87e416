"""The library version, written into every store file."""

__version__ = "0.1.0"
