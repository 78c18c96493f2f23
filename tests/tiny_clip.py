"""A tiny random CLIP model (transformers CLIPModel) with a processor built offline.

The processor pairs a CLIPImageProcessor (32 px) with the real MiniLM BERT tokenizer, so the model
reads real text. It measures nothing: it exercises the CLIP fine-tuning path in seconds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import tiny_models


def build_tiny_clip(target: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tiny_models.copy_bert_tokenizer(target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ... falling back to PIL"
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        projection_dim=16,
        # CLIP pools the text at the end-of-text token: BERT's [SEP] here
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    return target
