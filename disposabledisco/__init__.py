"""disposabledisco: a disposable Disco cluster on EC2 spot instances, kept converged to a config."""

__version__ = "0.1.0"
