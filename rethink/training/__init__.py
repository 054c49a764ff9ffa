"""The training engine: options (how a run executes), checkpoint (what one holds), loop (the pieces every loop
shares), optim (the SGD step), trainer (one run), packed (K runs as one batched model), grouping (which runs
may share a pack, without torch) and cpu (the CPU speed patches). Imports nothing itself.
"""
