"""Text stages of unsupervised adaptation (GPL): query generation, negative mining, teachers and
pseudo-labels, the label pipeline that chains them, and the catalog refresh's delta logic."""
