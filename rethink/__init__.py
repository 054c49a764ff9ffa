"""rethink: a reproduction of the CIFAR-10 experiments of Zhang et al. 2017."""

__version__ = "0.1.0"
