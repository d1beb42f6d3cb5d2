"""Kubeflow pipelines wiring kfopt components, their placement on node pools, and the runners.

- :mod:`kfopt.pipelines.optimize_and_promote`: the pipeline (``build_pipeline``, ``compile_pipeline``).
- :mod:`kfopt.pipelines.placement`: node pools from a YAML file (``placement.gke.yaml`` by default).
- :mod:`kfopt.pipelines.runners`: ``run_local`` (kfp.local) and ``submit`` (a Kubeflow cluster).

Importing this package imports neither TensorFlow nor kfp.
"""
