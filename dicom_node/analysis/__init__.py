"""Volume loading, analysis pipelines and compute-device handling."""
