"""Kubeflow pipelines wiring kfopt components."""
