"""vggdepth: vanishing gradients in a 38-layer VGG on CIFAR-100, and how batch normalisation fixes them."""

from vggdepth.errors import VggdepthError

__all__ = ["VggdepthError"]
