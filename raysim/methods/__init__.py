"""Helpers methods share: aggregation, class prototypes, FINCH, DSA, anchor diagnostics."""
