"""Inference: embeddings of a split, exact kNN search, the ensemble's post-processing, submissions and the report."""
