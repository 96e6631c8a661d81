"""The ``blockopt`` command line: ``demo``, ``probe`` and ``tune``."""
