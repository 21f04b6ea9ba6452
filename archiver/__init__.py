"""Build TorchServe .mar archives from diffusers pipelines."""
