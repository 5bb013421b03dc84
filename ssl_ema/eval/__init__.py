"""Evaluation of teachers, students and EMA copies.

During training (the trainer builds an `context.EvalContext` and runs the method's evaluation
before training, every ``eval.every_epochs`` and at the end): `evaluations` (which evaluation a
method gets), `teacher_student` (kNN), `classify` (top-1, NLL, ECE of each model's classifier),
`early_stopping`, `tables` (the end-of-run tables).

After training (`tools/eval.py`, `tools/transfer.py`, `tools/plot.py`, on a saved run): `trained`
(load a checkpoint), `protocols` (kNN and linear on frozen features), `linear`, `own_classifier`,
`transfer`, `consistency`, `curves`.

Both: `features`, `knn`, `calibration`.
"""
