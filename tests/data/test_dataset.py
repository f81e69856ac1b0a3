"""Model input from labelled products: the tokenizer trained on the data."""

from __future__ import annotations

from catalog_enrichment.data.dataset import train_wordpiece_tokenizer


def test_the_trained_tokenizer_lower_cases_but_keeps_accents_and_dakuten() -> None:
    texts = ["ガラス 花瓶", "ガラス 花瓶", "Café Crème", "Café Crème", "カラス 置物", "cafe"]
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=200, max_length=16)
    # ガ (ga) and カ (ka) differ only by the dakuten; stripping accents would make them one word
    assert tokenizer("ガラス")["input_ids"] != tokenizer("カラス")["input_ids"]
    assert tokenizer("CAFÉ")["input_ids"] == tokenizer("café")["input_ids"] != tokenizer("cafe")["input_ids"]
    assert tokenizer.decode(tokenizer("Café Crème")["input_ids"], skip_special_tokens=True) == "café crème"
