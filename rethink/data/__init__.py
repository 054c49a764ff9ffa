"""Data: CIFAR-10's files (cifar), synthetic look-alikes (synthetic), the randomization tests (corruptions),
the CIFAR-10 archive in a run store (archive), the paper's preprocessing (preprocess) and a run's data set
resident on the training device (device). Imports nothing itself: `rethink.data.corruptions` needs no torch.
"""
