"""The package version (its own module: the runtime records it without importing the API)."""

__version__ = "0.1.0"
