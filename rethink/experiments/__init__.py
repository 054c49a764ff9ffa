"""The experiments: each module declares its runs and its report section (`COMPONENTS`), and the catalogue
(rethink/suites.py) assembles suites from them. The paper's Figure 1 (randomization), Table 1 (table1) and
Figure 2b (fig2b), the quickstart, the explicit regularizers, Lobacheva et al.'s periodic behaviour, and the
Section 4 and 5 studies (expressivity, kernel), which are commands rather than suites. Imports nothing itself.
"""
