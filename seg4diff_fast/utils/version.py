"""The package version (one home, read by the package root, the CLI and run records)."""

__version__ = "0.1.0"
