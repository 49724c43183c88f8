"""raysim: Ray-based federated-learning simulation for prototype-based methods."""

__version__ = "0.1.0"
