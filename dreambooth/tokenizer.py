"""CLIP's tokenizer: text -> 77 token ids, as Stable Diffusion v1 reads a prompt.

Byte-level BPE in five steps
----------------------------
A neural network reads integers, so text must become a sequence of ids from a fixed
vocabulary (49408 entries for CLIP). Whole words would need an unbounded vocabulary and
single characters give long sequences, so CLIP uses byte-pair encoding (BPE, Sennrich et
al. 2016, "Neural Machine Translation of Rare Words with Subword Units"): frequent words
are one token, rare words are spelled from frequent pieces.

1. Normalise. Unicode NFC (an accented letter becomes one code point), every run of
   whitespace becomes one space, everything is lower-cased: "A  Dog\\n" -> "a dog".
2. Split into words with CLIP's regex: the contractions 's 't 're 've 'm 'll 'd, runs of
   letters, single digits, and runs of other symbols. Spaces are dropped, so
   "sks's 3 dogs!!" -> ["sks", "'s", "3", "dogs", "!!"]. Digits stay single, so "2023"
   is always four tokens.
3. Bytes to printable characters. Each word is written as UTF-8 bytes, and each of the
   256 byte values is drawn as one printable unicode character (`bytes_to_unicode`; the
   printable ASCII bytes stand for themselves). Any text, emoji and CJK included, is then
   a string over a 256-character alphabet, and no input is ever unknown.
4. Merge. Start from the characters of a word, with "</w>" appended to the last one to
   mark the end of the word ("dog" -> d o g</w>). The vocabulary file lists 48894 merge
   rules in the order they were learned ("i n", "t h", ...). Repeatedly apply the
   earliest-learned rule that occurs in the word until none applies:
   d o g</w> -> do g</w> -> dog</w>. Each remaining piece is one vocabulary entry.
5. Frame. Ids get <|startoftext|> (49406) before and <|endoftext|> (49407) after, are cut
   to 77 in all, and padded to 77 with 49407 too: SD v1 was trained on that padding and
   its UNet attends to all 77 positions, so padding with 0 ("!") changes the images.

The vocabulary is the 256 byte characters, the same with "</w>", one entry per merge rule
(the two pieces joined) and the two special tokens: 256 + 256 + 48894 + 2 = 49408.
The `tokenizers` package runs steps 1-4; this module only describes the pipeline, the
same one as HF's CLIPTokenizerFast, which equals OpenAI's SimpleTokenizer on ordinary text.

The vocabulary file bpe_simple_vocab_16e6.txt.gz is OpenAI's, from github.com/openai/CLIP,
Copyright (c) 2021 OpenAI, MIT License (full notice in bpe_simple_vocab_16e6.LICENSE).
"""
import functools
import gzip
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer
from tokenizers.models import BPE

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses: the file holds more than that
START, END = "<|startoftext|>", "<|endoftext|>"
# Step 2; the special tokens come first so a literal "<|endoftext|>" stays one piece.
WORD_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """Step 3: byte value -> one printable character, in the order of CLIP's vocabulary.

    Printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68
    (control characters, space, ...) map to chr(256), chr(257), ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + n for n in range(len(others))])}


@functools.cache
def _bpe() -> BPETokenizer:
    """Build the BPE pipeline from the vocabulary file, once per process."""
    lines = gzip.open(VOCAB_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}

    bpe = BPETokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=END))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_REGEX), behavior="removed", invert=True),
        # Also applies GPT-2's word regex (use_regex=True by default). After CLIP's split it
        # changes only odd input such as "<|ENDOFTEXT|>"; kept so ids match HF's CLIPTokenizerFast.
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # The special tokens typed literally in a prompt are matched before normalisation.
    bpe.add_special_tokens([AddedToken(START, special=True), AddedToken(END, special=True)])
    return bpe


class Tokenizer:
    """Prompts -> LongTensor [B, 77]: <|startoftext|>, the text's tokens, <|endoftext|>, padding."""

    max_length = 77
    room = max_length - 2  # for the text's tokens, between start and end
    start_id, end_id = 49406, 49407  # <|startoftext|>, <|endoftext|>; end also pads

    def __init__(self):
        self.bpe = _bpe()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("Tokenizer expects a list of prompts, got a single string")
        ids = torch.full((len(prompts), self.max_length), self.end_id, dtype=torch.long)
        for i, encoding in enumerate(self.bpe.encode_batch(prompts, add_special_tokens=False)):
            row = [self.start_id, *encoding.ids[:self.room], self.end_id]  # longer prompts are cut: see cut()
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def cut(self, prompt: str) -> tuple[int, str] | None:
        """None if CLIP reads all of `prompt`; else (its number of tokens, the part of the text CLIP reads)."""
        encoding = self.bpe.encode(prompt, add_special_tokens=False)
        if len(encoding.ids) <= self.room:
            return None
        return len(encoding.ids), prompt[: encoding.offsets[self.room - 1][1]]
