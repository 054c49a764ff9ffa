"""The paper's numbers and constants (Zhang et al. 2017, CIFAR-10): what the reproduction aims at and compares
with. Pure data: no torch, no numpy; every layer may import it.

Choices the paper leaves open are not here: they live with the code that makes them (docs/protocol.md).
"""

from __future__ import annotations

# The five models (Appendix A, Figure 3), by their command-line names, and their parameter counts (Table 1).
PAPER_PARAMS = {
    "inception": 1_649_402,
    "inception-nobn": 1_649_402,
    "alexnet": 1_387_786,
    "mlp-3x512": 1_735_178,
    "mlp-1x512": 1_209_866,
}
MODELS = tuple(PAPER_PARAMS)
DISPLAY = {
    "inception": "Small Inception",
    "inception-nobn": "Small Inception w/o BatchNorm",
    "alexnet": "Small AlexNet",
    "mlp-3x512": "MLP 3x512",
    "mlp-1x512": "MLP 1x512",
}

# Training (Appendix A): SGD with momentum 0.9, initial learning rates, x0.95 after every epoch.
MOMENTUM = 0.9
LR_DECAY = 0.95
DEFAULT_LR = {"inception": 0.1, "inception-nobn": 0.1, "alexnet": 0.01, "mlp-3x512": 0.01, "mlp-1x512": 0.01}

# Preprocessing (Appendix A): 32x32x3 images, the central 28x28 crop the networks see.
IMAGE = 32
CROP = 28
BORDER = (IMAGE - CROP) // 2  # the central crop takes rows and columns 2..29
INPUT_DIM = 3 * CROP * CROP  # 2352 values per preprocessed image
NUM_CLASSES = 10

# Table 1 (CIFAR-10 rows): model, random crop, weight decay, labels, train and test accuracy (%).
TABLE1_ROWS = [
    ("inception", True, True, "true", 100.0, 89.05),
    ("inception", True, False, "true", 100.0, 89.31),
    ("inception", False, True, "true", 100.0, 86.03),
    ("inception", False, False, "true", 100.0, 85.75),
    ("inception", False, False, "random", 100.0, 9.78),
    ("inception-nobn", False, True, "true", 100.0, 83.00),
    ("inception-nobn", False, False, "true", 100.0, 82.00),
    ("inception-nobn", False, False, "random", 100.0, 10.12),
    ("alexnet", True, True, "true", 99.90, 81.22),
    ("alexnet", True, False, "true", 99.82, 79.66),
    ("alexnet", False, True, "true", 100.0, 77.36),
    ("alexnet", False, False, "true", 100.0, 76.07),
    ("alexnet", False, False, "random", 99.82, 9.86),
    ("mlp-3x512", False, True, "true", 100.0, 53.35),
    ("mlp-3x512", False, False, "true", 100.0, 52.39),
    ("mlp-3x512", False, False, "random", 100.0, 10.48),
    ("mlp-1x512", False, True, "true", 99.80, 50.39),
    ("mlp-1x512", False, False, "true", 100.0, 50.51),
    ("mlp-1x512", False, False, "random", 99.34, 10.61),
]

# Figure 1a: Small Inception under five randomization tests, as (labels, pixels) modes and their names.
FIG1A_MODES = {
    ("true", "none"): "true labels",
    ("random", "none"): "random labels",
    ("true", "shuffled"): "shuffled pixels",
    ("true", "random"): "random pixels",
    ("true", "gaussian"): "gaussian",
}
# Figure 1b/1c: these models at label corruption levels p from 0 (true labels) to 1 (random labels).
FIG1BC_MODELS = ("inception", "alexnet", "mlp-1x512")
CORRUPTION_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# Section 5: minimum-norm kernel interpolation on CIFAR-10, test error (%), by (features, with l2).
PAPER_KERNEL_TEST_ERROR = {("gaussian", False): 46.0, ("random-conv", False): 17.0, ("random-conv", True): 15.0}
