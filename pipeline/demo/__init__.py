"""Demo models and data for `make run`, built offline from what ships with Python packages."""
