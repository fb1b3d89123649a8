"""Model implementations, looked up by the checkpoint's ``architectures``."""
