"""A lab for activation statistics of latent-diffusion UNets: spec -> data -> model -> train/stats -> charts -> site."""

__version__ = "0.1.0"
