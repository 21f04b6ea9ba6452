"""Build TorchServe .mar archives from diffusers pipelines."""

# Before anything imports diffusers: the handlers package filters transformers' torchvision notice.
import handlers  # noqa: F401
