"""Speed: the benchmark (bench), hardware peaks (peaks) and the typical DataLoader pipeline it is compared with
(baseline). What runs cost is the experiments' (experiments/estimates.py). Imports nothing itself."""
