"""The app a worker, beat or Flower runs (built on start), its signals and its metrics."""
