"""Evaluation: the protocol a set records (`protocol.py`) and the training that scores a set under it."""
