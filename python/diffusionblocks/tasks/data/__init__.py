"""Datasets the tasks share: where they come from (embedded, a local file or folder, or
fetched once into a cache), how they are split, and how training batches are drawn."""
