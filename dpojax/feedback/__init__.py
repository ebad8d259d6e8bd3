"""Preference sources for D3PO: reward proxies and user scorers behind one interface, human-feedback rounds,
their labels, and the labeling web page (``dpojax label ROUND``)."""

from dpojax.feedback.labels import LabelSet, read_labels
from dpojax.feedback.rounds import Round, read_round, write_round
from dpojax.feedback.scorers import Scorer, make_scorer, score_images

__all__ = ["LabelSet", "Round", "Scorer", "make_scorer", "read_labels", "read_round", "score_images",
           "write_round"]
