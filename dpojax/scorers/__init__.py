"""Scorers: what rates generated images, as rewards for D3PO, judges for ``dpojax eval``, AI feedback for
``dpojax data relabel|generate`` and ``train.eval_scorer``. Three layers, each importing only those below it:

- ``base``: the interface (``Scorer``, ``score_images``, ``score_per_image``); ``proxies``: the reward proxies
  that need no model (brightness, JPEG size).
- the model-based scorers, read from local files without torch: ``aesthetic`` (the LAION aesthetic predictor),
  ``clip_scorers`` (PickScore, CLIP score), ``hps`` (HPSv2), ``imagereward``, and ``batched``, the jitted,
  optionally mesh-sharded loop they share.
- ``registry``: specs (built-in names, ``package.module:callable``) and options -> a ``Scorer``
  (``make_scorer``, ``scorer_from_config``); it imports the model scorers only when it builds one.

Nothing is imported here, so ``import dpojax.scorers.base`` stays cheap. The human-feedback rounds and the
labeling page are ``dpojax.feedback``.
"""
