"""Comparing finished runs (tables, plots) and checking exports: used by command lines only."""
