"""TorchServe handler for diffusers pipelines and the small modules it wires together."""
