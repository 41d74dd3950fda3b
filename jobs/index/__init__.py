"""The document index: the embedding model, documents in Redis, FAISS replicas."""
