"""flexens: flexible deep-ensemble processing (Tann, Hashemi & Reda, 2018)."""

__version__ = "0.1.0"
