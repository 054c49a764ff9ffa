"""The report: the aggregation of a suite's runs into its report (aggregate) and the self-contained HTML page
(html). Imports nothing itself; the kit every section is drawn with is the experiments' own (experiments/kit.py).
"""
