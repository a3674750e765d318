"""Dashboard, REST API and Prometheus metrics."""
