"""KFP v2 components: thin wrappers over the kfopt step functions.

:mod:`kfopt.components.steps` holds what each step does, on local paths (tests
call it directly); :mod:`kfopt.components.ops` the KFP components wrapping it;
:mod:`kfopt.components.status` what each step reports to whoever runs the
pipeline (a StepStatus file per step, and the format of its progress lines).
Importing this package imports neither TensorFlow nor kfp.
"""

#: The image components run in unless told otherwise (build it from the Dockerfile and push it).
DEFAULT_IMAGE = "ghcr.io/kfopt/kfopt:0.1.0"
