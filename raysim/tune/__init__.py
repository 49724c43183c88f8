"""Sweeps on Ray Tune: sweep files and trials."""
