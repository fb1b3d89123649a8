"""The decode role: reserves blocks, receives KV, decodes with continuous batching."""
