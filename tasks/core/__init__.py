"""Infrastructure every stage stands on: the store, the model resolver, the registry and its gate, the
embedding cache, FAISS indexes, BM25, the held-out rule, evaluation and report helpers, settings shared
by every flow. Imports nothing of ``tasks.text``, ``tasks.catalog``, ``tasks.labelled`` or ``tasks.serving``."""
