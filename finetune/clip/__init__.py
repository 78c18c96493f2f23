"""Image/text training on a catalog's own pairs: settings, the shared loop, locked-text tuning (LiT),
CLIP fine-tuning with WiSE-FT, and the keyed training stage. No Prefect inside."""
