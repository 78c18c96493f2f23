"""Serving a registered model: search (dense, images) over the index saved next to a version, and
ONNX export with a parity check."""
