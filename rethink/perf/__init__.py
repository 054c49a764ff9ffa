"""Speed: the benchmark (bench), hardware peaks (peaks), the typical DataLoader pipeline it is compared with
(baseline), and what runs cost (estimates, torch-free). Imports nothing itself."""
