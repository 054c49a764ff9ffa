"""The cluster side: the Argo workflow of a suite as a plain Hera value (builder), its submission (submit, run
as `python workflows/submit.py`), and the committed reference renderings (golden). Needs the `workflows` extra
(Hera); imports no torch."""
