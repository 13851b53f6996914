"""Serving the ensemble over HTTP (``serve.py``)."""
