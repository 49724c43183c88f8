"""What a run leaves: sinks, metric and failure records, checkpoints, state files, sweep reports."""
