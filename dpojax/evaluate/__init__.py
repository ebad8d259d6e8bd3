"""``dpojax eval``: does a trained model beat its reference? Cached samples, scores, win rates with intervals."""
