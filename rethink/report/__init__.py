"""The report: the kit every section is drawn with (kit), the aggregation of a suite's runs into its report
(aggregate), and the self-contained HTML page (html). Imports nothing itself: experiments import the kit, and
the aggregation imports the experiments through the catalogue.
"""
