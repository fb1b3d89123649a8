"""The prefill role: chunked prefill that streams each finished layer's KV blocks to a decode worker."""
