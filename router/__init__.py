"""The front door: OpenAI-compatible HTTP API, pairing policy, cluster manager, the pdserve CLI."""
