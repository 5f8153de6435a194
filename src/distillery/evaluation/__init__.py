"""Evaluation: train fresh networks on a set and score them, the way the set records.

`protocol.py` the record a set carries (`EvalProtocol`) and how a run executes (`Scoring`); `dsa.py` and `rat.py`
the two protocols, each training its networks and scoring them; `score.py` the one dispatch, flag overrides and the
random-real baseline; `training.py` the flat SGD trainer shared with the experts (eager or captured); `parallel.py` runs
side by side on the CPU; `background.py` the run loop's evaluation in a background thread.
"""
