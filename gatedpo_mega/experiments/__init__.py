"""Experiments from data to report (``gatedpo mass-dynamics``)."""
