"""Wire contracts (.proto) and their generated Python code."""
