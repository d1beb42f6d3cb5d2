"""KFP v2 components: thin wrappers over the kfopt step functions.

:mod:`kfopt.components.steps` holds what each step does, on local paths (tests
call it directly); :mod:`kfopt.components.ops` the KFP components wrapping it.
Importing this package imports neither TensorFlow nor kfp.
"""

#: The image components run in unless told otherwise (build it from the Dockerfile and push it).
DEFAULT_IMAGE = "ghcr.io/kfopt/kfopt:0.1.0"
