"""Helpers methods share: exact aggregation, class prototypes and their FINCH clustering, a
sample's feature and label on either task, DSA, anchor diagnostics, the leakage probe."""
