"""The Kubeflow pipeline, the local runner and the `clipline` CLI."""
