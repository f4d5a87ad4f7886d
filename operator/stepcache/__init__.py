"""stepcache: a Kubernetes operator that serves pipeline steps whose result is already known from a cache."""

__all__ = ["__version__"]

__version__ = "0.1.0"
