"""The run itself: configuration, checkpoints, the run log, metric sinks, dataset setup."""
