"""Tokenizers for the shapes world, built in code from the world's vocabulary.

Nothing is read from a hub. One word-level vocabulary serves all three embedded models:

* ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, then the words in a fixed order, and ``<eos>`` at the
  **largest** id. ``<bos>``/``<eos>`` frame every sequence (CLIP's start/end of text, the GPT-2
  decoder's start and end, BLIP's decoder start and ``[SEP]``). ``<eos>`` sits at the largest id so
  that even open_clip's default argmax pooling finds it; our CLIP config also pools
  explicitly at ``eos_id``.
* Text is lower-cased and split on white space and punctuation; words outside the vocabulary map
  to ``<unk>`` and :func:`unknown_words` reports them (the app flags them).

A checkpoint names its tokenizer by a reference (``config.json`` -> ``model.tokenizer``, e.g.
``{"kind": "shapes-word-v1", "digest": ...}``); :data:`TOKENIZERS` maps each kind to the function that
builds it, and :func:`tokenizer_from_ref` is the one door.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..checkpoints import CheckpointError
from ..registry import Registry

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
TOKENIZER_KIND = "shapes-word-v1"

# Every word the shapes world can emit (docs/SHAPES_WORLD.md): captions, caption prefixes, prompts of the
# six zero-shot datasets, VQA questions and answers, TGA-ZSR's "this is a photo of a {}" template.
_WORLD_WORDS = (
    # colours, shapes (+ plurals), sizes, positions, counts
    "red green blue yellow purple orange white black "
    "circle square triangle diamond star cross "
    "circles squares triangles diamonds stars crosses "
    "small large left middle right one two three "
    # function words of captions, prefixes and prompts
    "a an the on in and of photo image picture there is this shapes shape object objects "
    # questions and answers
    "what color colour size how many are where yes no "
    # punctuation kept as tokens
    "? , : ."
).split()


def shapes_vocabulary() -> list[str]:
    """The full vocabulary in id order (specials included, ``<eos>`` last)."""
    seen: list[str] = []
    for w in _WORLD_WORDS:
        if w not in seen:
            seen.append(w)
    return [PAD, UNK, BOS, *seen, EOS]


def vocabulary_digest(vocab: list[str]) -> str:
    """Short hash of a vocabulary, stored in checkpoints to catch a tokenizer mismatch."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


def build_shapes_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer over the shapes vocabulary.

    ``tokenizer(text)`` gives ``<bos> words <eos>``; ``add_special_tokens=False`` gives the words only.
    """
    vocab = shapes_vocabulary()
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
    )
    fast.init_kwargs["vlm_inspect_kind"] = TOKENIZER_KIND
    return fast


_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` that ``tokenizer`` maps to its unknown token (in order, without repeats).

    Sub-word tokenizers (BPE, WordPiece with a full vocabulary) know every word: they give ``[]``.
    """
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is None:
        return []
    out: list[str] = []
    for word in _WORD_RE.findall(text.lower()):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if unk_id in ids and word not in out:
            out.append(word)
    return out


# ---- stand-in tokenizers for pretrained architectures built with random weights -----------------
# The real GPT-2 / BERT vocabularies are not shipped, and transformers can silently return an empty
# tokenizer offline. A model with random weights does not need the real vocabulary, only ids that
# fit its embedding table and the same special-token ids, so these are built in code.

def byte_level_gpt2_standin(eos_id: int = 50256) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges (the 256 byte symbols at ids 0-255) and ``<|endoftext|>`` at
    ``eos_id``: every text encodes, ids fit GPT-2's table, specials match nlpconnect's config."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=1024)


def char_wordpiece_bert_standin(vocab_size: int = 30524) -> PreTrainedTokenizerFast:
    """Character-level WordPiece with BERT's special ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103) and BLIP's [DEC]=30522 / [ENC]=30523, padded to ``vocab_size`` with unused tokens."""
    from tokenizers import decoders

    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    words = chars + ["##" + c for c in chars]
    vocab_list = [f"[unused{i}]" for i in range(vocab_size)]
    for i, special in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]",
                       30522: "[DEC]", 30523: "[ENC]"}.items():
        if i < vocab_size:
            vocab_list[i] = special
    for j, w in enumerate(words):
        vocab_list[1000 + j] = w
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab_list)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", model_max_length=512)


def clip_bpe_standin(vocab_size: int = 49408, model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges (the 256 byte symbols at ids 0-255), lower-cased like CLIP's, with CLIP's
    ``<|startoftext|>`` = ``vocab_size - 2`` (49406) and ``<|endoftext|>`` = ``vocab_size - 1`` (49407, also
    padding): every text encodes, ids fit the table, and the end of text is the largest id, so both of
    transformers' pooling rules (first ``eos_token_id``, or argmax of the ids) find it."""
    from tokenizers import decoders

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[bos], vocab[eos] = vocab_size - 2, vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos,
                                   model_max_length=model_max_length)


def llava_byte_standin(vocab_size: int = 32064, image_id: int = 32000, pad_id: int = 32001) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges for a random-weight LLaVA: Llama's ``<unk>`` = 0, ``<s>`` = 1 (put first,
    as Llama's tokenizer does), ``</s>`` = 2, the 256 byte symbols at 3-258, and LLaVA's ``<image>`` and
    ``<pad>`` at the ids its config names; no chat template (the adapter falls back to LLaVA-1.5's)."""
    from tokenizers import AddedToken, decoders

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    vocab["<image>"], vocab["<pad>"] = image_id, pad_id
    if not 259 <= min(image_id, pad_id) <= max(image_id, pad_id) < vocab_size or image_id == pad_id:
        raise CheckpointError(f"the LLaVA stand-in tokenizer needs <image> = {image_id} and <pad> = {pad_id} apart, "
                              f"above its 259 byte and special ids and below the vocabulary size {vocab_size}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<image>",
                                                                                     "<pad>")])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096)


# ---- tokenizer references -------------------------------------------------------------------------

TOKENIZERS: Registry[Callable[[dict[str, Any], Path | None], Any]] = Registry("tokenizer kind")


def shapes_tokenizer_ref(_architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference to the shapes-world tokenizer of this version (its vocabulary's digest included)."""
    vocab = shapes_vocabulary()
    return {"kind": TOKENIZER_KIND, "vocab_size": len(vocab), "digest": vocabulary_digest(vocab)}


def tokenizer_from_ref(ref: dict[str, Any], folder: Path | str | None) -> Any:
    """The tokenizer a checkpoint's reference names (``folder``: the checkpoint, for tokenizer files)."""
    kind = ref.get("kind")
    if kind not in TOKENIZERS.list():  # exact: a config is not retyped
        raise CheckpointError(f"unknown tokenizer kind {kind!r} in {folder}")
    return TOKENIZERS.get(kind)(ref, Path(folder) if folder is not None else None)


@TOKENIZERS.register(TOKENIZER_KIND)
def _shapes(ref: dict[str, Any], folder: Path | None) -> PreTrainedTokenizerFast:
    vocab = shapes_vocabulary()
    if ref.get("digest") not in (None, vocabulary_digest(vocab)):
        raise CheckpointError(
            f"{folder}: the checkpoint was trained with a different shapes vocabulary "
            f"(digest {ref.get('digest')}, this version has {vocabulary_digest(vocab)})")
    return build_shapes_tokenizer()


@TOKENIZERS.register("open_clip")
def _open_clip(ref: dict[str, Any], folder: Path | None) -> Any:
    import open_clip

    return open_clip.get_tokenizer(ref["name"])


TOKENIZERS.register("gpt2-byte-standin", lambda ref, folder: byte_level_gpt2_standin(ref.get("eos_id", 50256)))
TOKENIZERS.register("bert-char-standin", lambda ref, folder: char_wordpiece_bert_standin(ref.get("vocab_size", 30524)))
TOKENIZERS.register("llava-byte-standin", lambda ref, folder: llava_byte_standin(
    ref.get("vocab_size", 32064), ref.get("image_id", 32000), ref.get("pad_id", 32001)))
TOKENIZERS.register("clip-bpe-standin", lambda ref, folder: clip_bpe_standin(ref.get("vocab_size", 49408),
                                                                       ref.get("context_length", 77)))


# what a transformers tokenizer is saved as: a fast tokenizer, BPE / WordPiece vocabularies, sentencepiece models
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# model_type -> (the files its tokenizer is, the class that saves it), for the message of a folder without them
_TOKENIZER_HINTS = {"clip": ("tokenizer.json, or vocab.json + merges.txt", "CLIPTokenizer")}


def _no_tokenizer_files(folder: Path) -> CheckpointError:
    """One sentence: ``folder`` was saved without its tokenizer, and how to add it."""
    from ..checkpoints import read_config

    try:
        config = read_config(folder)
    except CheckpointError:
        config = {}
    model_type = str(config.get("model_type", ""))
    what = ((config.get("architectures") or [None])[0] or model_type or "checkpoint") if "format" not in config \
        else "checkpoint"
    files, cls = _TOKENIZER_HINTS.get(model_type, ("tokenizer.json, or the tokenizer's vocabulary files",
                                                   "AutoTokenizer"))
    return CheckpointError(f"{folder}: this {what} folder has no tokenizer files ({files}); save the tokenizer with "
                           f"it ({cls}.from_pretrained(<the model's hub id>).save_pretrained(<folder>)) and load it "
                           "again")


@TOKENIZERS.register("files")
def hf_tokenizer_from_folder(ref: dict[str, Any] | None, folder: Path | str | None) -> Any:
    """The tokenizer files saved in ``folder`` (a transformers ``save_pretrained`` folder)."""
    from transformers import AutoTokenizer

    if folder is not None and not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        raise _no_tokenizer_files(Path(folder))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"could not load the tokenizer files in {folder}: {e}") from e
    if len(tok) == 0 or not tok("a test", add_special_tokens=False)["input_ids"]:
        # transformers 5 can hand back an empty tokenizer without an error
        raise CheckpointError(f"the tokenizer in {folder} is empty (missing vocabulary files?)")
    return tok
