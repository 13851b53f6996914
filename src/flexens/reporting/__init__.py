"""Run reporting: loggers (W&B offline by default, CSV), tables and plots."""
