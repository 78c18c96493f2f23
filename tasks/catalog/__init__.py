"""Catalog image/text stages: image/text pairs, the image tower, the catalog encoders, catalog
evaluation on held-out products and the picture report."""
