"""Tokenizer parity: our ids == transformers' CLIPTokenizerFast and OpenAI's SimpleTokenizer.

Both references are built from the same shipped vocabulary file, the way OpenAI's simple_tokenizer.py reads it
(tests/references.py), independently of dreambooth/tokenizer.py.
"""
import html
import json
import unicodedata

import pytest
import regex
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from dreambooth.tokenizer import Tokenizer
from tests.references import reference_tokenizer, write_clip_vocab

LONG = "a highly detailed photograph of a sks dog sitting on a red sofa in a sunlit living room, " * 4

PROMPTS = [
    "",
    "a photo of sks dog",
    "A PHOTO OF SKS DOG",
    "a photo of a dog",
    "photo of a sks dog in a bucket",
    "a [V] backpack on the beach",
    "portrait of a cat, oil painting, trending on artstation, 4k, highly detailed",
    "Hello, world!",
    "what?!?! no... yes;; maybe: (ok) [fine] {sure} <tag>",
    "e-mail: someone@example.com, url https://example.com/a_b?c=d&e=f#g",
    "C++ and C# and F# -- em—dash – en-dash",
    "100% sure, 3.14159, -42, 1e10, 2023-05-01, 12:30pm, $5.99, #1",
    "0123456789",
    "room 101 has 2 beds and 15 chairs",
    "café crème brûlée à la mode, naïve façade, jalapeño, Ærøskøbing",
    "Ünïcödé ÀÉÎÕÜ ß ẞ",
    "e\u0301 combining acute vs é precomposed",
    "Ångström and A\u030angstro\u0308m",
    "東京の夜景、ネオン、雨",
    "一只可爱的小狗在草地上",
    "한국어 문장입니다",
    "Москва, зимний вечер",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ภาษาไทย",
    "a dog 🐶 with sunglasses 😎 on a skateboard 🛹",
    "👨‍👩‍👧‍👦 family emoji with zero width joiners",
    "🇫🇷 flag and ❤️ heart with variation selector",
    "a    lot   of     spaces",
    "   leading and trailing spaces   ",
    "new\nlines\n\nand\r\nwindows line ends",
    "tabs\tbetween\t\twords",
    "mixed \t\n\r\x0b\x0c whitespace",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "zero\u200bwidth space",
    "it's the dog's ball, isn't it? they're here, we've been, I'm ok, you'll see, he'd go",
    "IT'S LOUD, DON'T SHOUT",
    "rock 'n' roll, 'quoted', ''double'', '''triple'''",
    "curly ’apostrophes’ and “quotes”",
    "'s 't 're 've 'm 'll 'd at word starts",
    "a<|endoftext|>b",
    "an <|ENDOFTEXT|> typed in capitals",
    "<|startoftext|>text<|endoftext|>",
    "photo of sks dog, (masterpiece:1.2), [[blurry]], {{best}}",
    "negative: lowres, bad anatomy, bad hands, text, error, missing fingers",
    "weird punctuation: ¿¡ « » ‹ › „ ‚ … · • ° ± × ÷ ¶ § © ® ™",
    "math: ∑ ∫ √ ∞ ≠ ≤ ≥ π θ λ",
    "underscores_and-hyphens_mixed-up",
    "camelCaseWordsAndALLCAPS",
    "x",
    "!",
    "sks",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\x00control\x01chars\x7f",
    "#hashtag @mention $money %percent ^caret &amp *star",
    "&lt;html&gt; entities &amp; stuff",
    LONG,
    " ".join(str(i) for i in range(200)),
    "word " * 75,
    "word " * 74 + "end",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def hf():
    return reference_tokenizer()


def hf_ids(hf, prompts):
    return hf(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids


def test_cut_counts_the_reference_tokens(hf):
    """cut() names exactly the prompts that the reference cuts, with the reference's length before the cut, and
    the text it keeps tokenizes to the first 75 of the reference's tokens."""
    tok = Tokenizer()
    cuts = {i: tok.cut(prompt) for i, prompt in enumerate(PROMPTS) if tok.cut(prompt)}
    lengths = [len(ids) for ids in hf(PROMPTS, add_special_tokens=False).input_ids]
    assert {i: n for i, (n, _) in cuts.items()} == {i: n for i, n in enumerate(lengths) if n > 75}
    assert len(cuts) >= 2
    for i, (_, kept) in cuts.items():
        reference = hf([kept, PROMPTS[i]], add_special_tokens=False).input_ids
        assert reference[0] == reference[1][:75]


def test_matches_clip_tokenizer_fast(hf):
    ours = Tokenizer()(PROMPTS)
    ref = hf_ids(hf, PROMPTS)
    for prompt, a, b in zip(PROMPTS, ours, ref):
        assert a.tolist() == b.tolist(), prompt


class SimpleTokenizer:
    """OpenAI CLIP's simple_tokenizer.py (github.com/openai/CLIP, MIT), transcribed.

    One change: ftfy.fix_text (not installed) is replaced by its NFC step.
    """

    def __init__(self, vocab_dir):
        self.encoder = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
        merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return " ".join(word)

    def encode(self, text):
        text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token).split(" ")]
        return ids


def test_matches_openai_simple_tokenizer_where_references_agree(vocab_dir, hf):
    """The two references differ on a few inputs (html entities, a literal special token);
    everywhere they agree, ours agrees with both, and they agree on most prompts."""
    simple = SimpleTokenizer(vocab_dir)
    tok = Tokenizer()
    agreed = 0
    for prompt in PROMPTS:
        ids = simple.encode(prompt)
        if len(ids) > 75 or hf(prompt, add_special_tokens=False).input_ids != ids:
            continue
        agreed += 1
        assert tok([prompt])[0].tolist() == [49406, *ids, *[49407] * (76 - len(ids))], prompt
    assert agreed >= 45


def test_framing_and_padding():
    tok = Tokenizer()
    ids = tok(["", "a photo of sks dog"])
    assert ids.dtype == torch.long and ids.shape == (2, tok.max_length) == (2, 77)
    assert ids[0].tolist() == [49406] + [49407] * 76
    n = 2 + len(tok.bpe.encode("a photo of sks dog", add_special_tokens=False).ids)
    assert ids[1, 0] == 49406 and (ids[1, n - 1 :] == 49407).all() and (ids[1, 1 : n - 1] < 49406).all()
    assert tok([]).shape == (0, 77)


def test_truncation_keeps_end_token_and_cut_says_where():
    tok = Tokenizer()
    ids = tok(["fits", "word " * 80])
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] != 49407).all()
    assert tok.cut("fits") is None and tok.cut("word " * 80) == (80, ("word " * 75).strip())


def test_exactly_75_tokens_is_not_truncated():
    ids = Tokenizer()(["word " * 75])
    assert Tokenizer().cut("word " * 75) is None and ids[0, -1] == 49407 and ids[0, -2] != 49407


def test_single_string_is_an_error():
    with pytest.raises(TypeError, match="list of prompts"):
        Tokenizer()("a photo of sks dog")
