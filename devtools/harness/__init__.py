"""Real servers started, driven and stopped by tests and benchmarks: TorchServe, a Ray cluster, BentoML."""
