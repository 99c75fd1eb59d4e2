"""Small trainable heads on backbone features (GAN discriminators)."""

from .discriminator import DiscriminatorHead

__all__ = ["DiscriminatorHead"]
