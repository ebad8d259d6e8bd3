"""Human feedback for D3PO: rounds of sampled images (``rounds``), the people's labels of them (``labels``), and
the labeling web page that collects them (``server``, ``label_page.html``; ``dpojax label ROUND``). Scorers, the
automatic preference sources, are ``dpojax.scorers``."""

from dpojax.feedback.labels import LabelSet, read_labels
from dpojax.feedback.rounds import Round, read_round, write_round

__all__ = ["LabelSet", "Round", "read_labels", "read_round", "write_round"]
