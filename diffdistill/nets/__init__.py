"""Small trainable heads on backbone features (GAN discriminators)."""

from .discriminator import DiscriminatorHead, FeatureDiscriminator

__all__ = ["DiscriminatorHead", "FeatureDiscriminator"]
