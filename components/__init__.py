"""KFP v2 components: thin wrappers over the kfopt step functions."""
