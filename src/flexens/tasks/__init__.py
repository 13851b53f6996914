"""The task layer: what the ``@hydra.main`` entry points run.

These modules (with :mod:`flexens.cli` and :mod:`flexens.reporting.loggers`) are the only
ones that read the config tree: they instantiate typed objects from it and hand those down.
"""
