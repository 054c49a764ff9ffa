"""The training engine: trainer (the one epoch loop of K runs, their state and restore, the schedule; a single run
is K = 1), packed (the step of K >= 2 runs as one batched model), options (how runs execute), checkpoint (what
one holds), loop (the loop's pieces: step boundaries, evaluation, the SGD step of a module, a run's end), optim
(SGD), grouping (which runs may share a pack, without torch), cpu and fast (the CPU speed patches and exact fast
layers). Imports nothing itself.
"""
