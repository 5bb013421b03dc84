"""The reproduction suite: the papers' claims as studies, run in budgets, stored and reported.

``tools/reproduce.py`` drives it. A study (``study.py``) is a recipe, variants and seeds, the
claim it tests and an analysis that gives a verdict; the catalogue (``catalog.py``) lists them
in priority order. Each run is a ``tools/train.py`` process planned by the sweep machinery
(``ssl_ema/engine/sweep.py``), so a finished run whose resolved config is unchanged is reused
and a cut one resumes from its checkpoint. ``runner.py`` spends a time budget on pending runs,
``store.py`` keeps each finished run's record in ``docs/results/<study>.json`` and
``report.py`` regenerates the tables, figures and verdicts from those records alone.
"""
