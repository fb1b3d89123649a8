"""Serving backends: the cluster of prefill and decode workers behind the HTTP layer."""
