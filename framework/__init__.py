"""The library behind the entry-point scripts (``main.py``, ``flops.py``, ``benchmark.py``, ``study.py``,
``visualize.py``): options and JSON configs, builders (config -> model, data, optimizer, EMA, DDP), FLOPs counting
conventions, the papers' published numbers, the timing protocol, and the study's rows, tables and plots.

Models live in ``models/``; the training and evaluation loops in ``engine.py`` (as in DeiT)."""
