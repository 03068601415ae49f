"""Load llama2.c checkpoints ("legacy v0" ``.bin``) and tokenizers as a ``HookedTransformer``.

Format (little-endian): a header of 7 int32 — dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size (negative: classifier not shared with the embedding), seq_len — then float32 tensors:
token embedding ``[vocab, dim]``; attention RMSNorm ``[L, dim]``; wq ``[L, dim, dim]``; wk, wv
``[L, kv_dim, dim]``; wo ``[L, dim, dim]``; FFN RMSNorm ``[L, dim]``; w1 ``[L, hidden, dim]``;
w2 ``[L, dim, hidden]``; w3 ``[L, hidden, dim]``; final RMSNorm ``[dim]``; two legacy RoPE tables
``[seq_len, head_size/2]`` (skipped: TransformerLens recomputes them); the classifier
``[vocab, dim]`` when not shared. Linear weights are stored ``[out, in]``.

The architecture is Llama: RMSNorm (eps 1e-5), rotary embeddings on adjacent pairs (base 10000),
grouped-query attention, SwiGLU MLP ``(silu(x W1) * (x W3)) W2``, no biases.

The tokenizer file holds int32 ``max_token_length`` then, per token, float32 score, int32 byte
length and the piece bytes; it is a SentencePiece-style BPE with byte fallback (``<0xNN>``)
where encoding repeatedly merges the adjacent pair whose merged piece has the highest score.
It is rebuilt here as a Hugging Face ``tokenizers`` BPE (merges ranked by score) so TransformerLens's
``to_tokens`` / ``to_string`` work on it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import einops
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from circuitgraph.errors import ModelLoadError
from dictionaries.model_identity import with_fingerprint

_HEADER = struct.Struct("<7i")
_SPACE = "\u2581"  # SentencePiece's visible space


class Llama2cHeader(NamedTuple):
    """The seven header integers of a llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int


def read_header(path: str | Path) -> Llama2cHeader:
    """Read and sanity-check the header of a llama2.c checkpoint."""
    raw = Path(path).read_bytes()[: _HEADER.size]
    if len(raw) < _HEADER.size:
        raise ModelLoadError(f"{path} is too short to be a llama2.c checkpoint (no 28-byte header)")
    h = Llama2cHeader(*_HEADER.unpack(raw))
    if min(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.seq_len) <= 0 or h.dim % h.n_heads:
        raise ModelLoadError(f"{path} has an implausible llama2.c header {h}; is it a legacy v0 .bin checkpoint?")
    return h


def _read_tensors(path: Path, h: Llama2cHeader) -> dict[str, torch.Tensor]:
    shared = h.vocab_size > 0
    vocab = abs(h.vocab_size)
    head = h.dim // h.n_heads
    kv_dim = h.n_kv_heads * head
    L = h.n_layers
    shapes = [
        ("tok_emb", (vocab, h.dim)), ("attn_norm", (L, h.dim)), ("wq", (L, h.dim, h.dim)),
        ("wk", (L, kv_dim, h.dim)), ("wv", (L, kv_dim, h.dim)), ("wo", (L, h.dim, h.dim)),
        ("ffn_norm", (L, h.dim)), ("w1", (L, h.hidden_dim, h.dim)), ("w2", (L, h.dim, h.hidden_dim)),
        ("w3", (L, h.hidden_dim, h.dim)), ("final_norm", (h.dim,)),
        ("rope_real", (h.seq_len, head // 2)), ("rope_imag", (h.seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("classifier", (vocab, h.dim)))
    expected = _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    size = path.stat().st_size
    if size < expected:
        raise ModelLoadError(f"{path} is truncated: {size} bytes, the header implies {expected}")
    data = np.fromfile(path, dtype="<f4", offset=_HEADER.size)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(data[offset : offset + n].reshape(shape).copy())
        offset += n
    if shared:
        out["classifier"] = out["tok_emb"]
    return out


def llama2c_config(h: Llama2cHeader, name: str = "llama2c") -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of a llama2.c architecture."""
    return HookedTransformerConfig(
        n_layers=h.n_layers, d_model=h.dim, d_head=h.dim // h.n_heads, n_heads=h.n_heads,
        n_key_value_heads=h.n_kv_heads if h.n_kv_heads != h.n_heads else None,
        d_mlp=h.hidden_dim, n_ctx=h.seq_len, d_vocab=abs(h.vocab_size), act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=h.dim // h.n_heads,
        rotary_base=10000, rotary_adjacent_pairs=True, gated_mlp=True, final_rms=True, eps=1e-5,
        original_architecture="LlamaForCausalLM", model_name=name,
    )


def llama2c_state_dict(t: dict[str, torch.Tensor], h: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors (``[out, in]``) onto TransformerLens parameter names and layouts."""
    sd: dict[str, torch.Tensor] = {"embed.W_E": t["tok_emb"]}
    gqa = h.n_kv_heads != h.n_heads
    k_name, v_name = ("_W_K", "_W_V") if gqa else ("W_K", "W_V")
    for layer in range(h.n_layers):
        p = f"blocks.{layer}."
        sd[p + "ln1.w"] = t["attn_norm"][layer]
        sd[p + "attn.W_Q"] = einops.rearrange(t["wq"][layer], "(h d) m -> h m d", h=h.n_heads)
        sd[p + "attn." + k_name] = einops.rearrange(t["wk"][layer], "(h d) m -> h m d", h=h.n_kv_heads)
        sd[p + "attn." + v_name] = einops.rearrange(t["wv"][layer], "(h d) m -> h m d", h=h.n_kv_heads)
        sd[p + "attn.W_O"] = einops.rearrange(t["wo"][layer], "m (h d) -> h d m", h=h.n_heads)
        sd[p + "ln2.w"] = t["ffn_norm"][layer]
        sd[p + "mlp.W_gate"] = t["w1"][layer].T
        sd[p + "mlp.W_in"] = t["w3"][layer].T
        sd[p + "mlp.W_out"] = t["w2"][layer].T
    sd["ln_final.w"] = t["final_norm"]
    sd["unembed.W_U"] = t["classifier"].T
    return sd


class Llama2cVocab(NamedTuple):
    """A llama2.c tokenizer file's contents."""

    pieces: list[str]
    """Token strings, literal spaces included (byte-fallback pieces read ``<0xNN>``)."""
    scores: list[float]
    """Merge priority of each piece (higher merges first)."""


def read_llama2c_vocab(path: str | Path, vocab_size: int) -> Llama2cVocab:
    """Parse a llama2.c ``tokenizer.bin`` with ``vocab_size`` entries."""
    raw = Path(path).read_bytes()
    pieces, scores = [], []
    offset = 4  # max_token_length
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            piece = raw[offset : offset + length]
            if len(piece) != length:
                raise struct.error("short piece")
            offset += length
            pieces.append(piece.decode("utf-8", errors="replace"))
            scores.append(score)
    except struct.error as err:
        raise ModelLoadError(f"{path} is truncated or not a llama2.c tokenizer for {vocab_size} tokens") from err
    return Llama2cVocab(pieces, scores)


def build_llama2c_tokenizer(vocab: Llama2cVocab, bos_id: int = 1, eos_id: int = 2) -> PreTrainedTokenizerFast:
    """A fast BPE tokenizer reproducing llama2.c's ``encode`` (dummy prefix space, score-ranked merges, byte fallback)."""
    sp_pieces = [p.replace(" ", _SPACE) for p in vocab.pieces]
    ids = {p: i for i, p in enumerate(sp_pieces)}
    merges: list[tuple[float, int, tuple[str, str]]] = []
    for i, piece in enumerate(sp_pieces):
        if i <= eos_id or piece.startswith("<0x") or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-vocab.scores[i], i, (left, right)))
    merges.sort()
    bpe = models.BPE(vocab=ids, merges=[m for _, _, m in merges], byte_fallback=True, fuse_unk=True,
                     unk_token=sp_pieces[0])
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bos, eos = sp_pieces[bos_id], sp_pieces[eos_id]
    tok.add_special_tokens([sp_pieces[0], bos, eos])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=sp_pieces[0],
                                   pad_token=eos, add_bos_token=True, name_or_path="llama2c", padding_side="right")


def load_llama2c(model_path: str | Path, tokenizer_path: str | Path | None = None, device: str = "cpu") -> HookedTransformer:
    """A ``HookedTransformer`` with the weights of a llama2.c checkpoint (and its tokenizer when given).

    Raises:
        ModelLoadError: a file is missing, truncated or not in llama2.c format.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelLoadError(f"llama2.c checkpoint {model_path} not found")
    h = read_header(model_path)
    tensors = _read_tensors(model_path, h)
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        if not tokenizer_path.is_file():
            raise ModelLoadError(f"llama2.c tokenizer {tokenizer_path} not found")
        tokenizer = build_llama2c_tokenizer(read_llama2c_vocab(tokenizer_path, abs(h.vocab_size)))
    cfg = llama2c_config(h, name=model_path.stem)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    sd = llama2c_state_dict(tensors, h)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    real_missing = [k for k in missing if not k.endswith(("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V", "b_in", "b_out",
                                                           "b_U", "IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if unexpected or real_missing:
        raise ModelLoadError(f"llama2.c weights did not map onto TransformerLens: missing {real_missing}, unexpected {unexpected}")
    for name, param in model.named_parameters():  # biases TransformerLens creates are zero in Llama
        if name.split(".")[-1].lstrip("_").startswith("b_"):
            torch.nn.init.zeros_(param)
    model.cfg.model_name = with_fingerprint(cfg.model_name, model)  # renaming the file keeps its dictionaries
    if str(device) != "cpu":
        model.to(device)
    model.eval()
    return model
