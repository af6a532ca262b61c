"""The landmark service: a Ray Serve application that answers recognition and retrieval queries as the batch
ensemble (``infer/ensemble.py``) does, from the models and embeddings an ensemble run left behind."""
