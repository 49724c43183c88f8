"""Neural-network helpers: the models, local training, the task losses and metrics."""
