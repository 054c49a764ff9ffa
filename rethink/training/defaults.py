"""Execution defaults stated once, without torch: the training options use them, and the command line's defaults
and help read them from here (building the parser imports no torch)."""

CHECKPOINT_MINUTES = 10.0  # also checkpoint mid-epoch when an epoch runs longer than this
LEASE_SECONDS = 120.0  # a run's lease expires this long after its trainer last renewed it
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes (reduce-overhead: CUDA graphs)
