"""What each command of ``maskrcnn`` does, as one function callable from Python: ``predict_files``
(``maskrcnn predict``) and ``evaluate_files`` (``maskrcnn evaluate``). They sit above the
inference, evaluation and application packages they combine; ``cli.py`` only parses flags into
their options and calls them."""
