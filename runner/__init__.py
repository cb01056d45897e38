"""Activation statistics lab for latent-diffusion UNets: spec -> data -> model -> train -> charts -> site."""

__version__ = "0.1.0"
