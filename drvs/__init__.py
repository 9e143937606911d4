"""DRVS: virtual machines built out of resources spread over several Linux nodes."""

__version__ = "0.1.0"
