"""The toy language's tokenizer: a word-level vocabulary in GPT-2's byte-level convention.

Built with the Hugging Face ``tokenizers`` library so that it serialises to one standard
``tokenizer.json`` and wraps as a ``PreTrainedTokenizerFast``, which is what
``HookedTransformer.to_tokens`` / ``to_string`` expect. Conventions match GPT-2:

* a word after a space is one token carrying the space (``" Mary"`` is ``"ĠMary"``);
* a year is split into two-digit tokens, so ``" 1732"`` is ``" 17"`` + ``"32"`` as in GPT-2, which
  is what the greater-than task needs;
* ``<|endoftext|>`` is the BOS, EOS and padding token; unknown words map to ``<unk>``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from circuitgraph.toylang.lexicon import PUNCTUATION, TWO_DIGITS, all_words

BOS = "<|endoftext|>"
UNK = "<unk>"
_SPACE = "Ġ"  # GPT-2's byte-level stand-in for a leading space


def build_tokenizer() -> Tokenizer:
    """Build the toy-language tokenizer from the lexicon (deterministic: fixed vocabulary order)."""
    vocab: dict[str, int] = {BOS: 0, UNK: 1}
    pieces = list(PUNCTUATION) + list(TWO_DIGITS) + all_words()
    for piece in pieces:
        for form in (piece, _SPACE + piece):
            if form not in vocab:
                vocab[form] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, UNK])
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` so that TransformerLens can use it."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        padding_side="right",
        add_bos_token=True,
        name_or_path="circuitgraph-toylang",
    )

