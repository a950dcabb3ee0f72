"""envenc-ray: a frozen, truncated vision-language model plus an autoencoder as the state of RL agents."""

__version__ = "0.1.0"
