"""daipnet_jax: DAIPNet, LRF and SSD one-stage detectors in JAX/Flax."""

__version__ = "0.1.0"
