"""The joint vocabulary of the tiny shapes-world LMM: special tokens, one token per prompt category, the world's
words, then the image tokens.

Id layout (fixed by construction order, so a saved model's ids stay valid as long as the word list is the same)::

    [0, len(SPECIALS))                      special tokens (<pad> is 0)
    next len(categories) ids                one "<cat:NAME>" token per prompt category
    next len(words) ids                     text words (duplicates of the above dropped)
    [image_offset, image_offset + n_img)    image token k of the world's ImageTokenizer has id image_offset + k

Sequence formats the model is trained on (``→`` marks where the loss starts)::

    write    <bos> <write> <cat:C>               → w1 … wn <eos>
    gen      <bos> <gen> w1 … wn <img>           → t1 … t9 </img>
    gen-feat <bos> <gen> w1 … wn <img> [slot1 … slotL]   (feature head on the slot positions)
    dec      <bos> <dec> w1 … wn <sep>           → q1 words <sep> q2 words <sep> … <eos>
    copy     <bos> <copy> w1 … wn <sep>          → w1 … wn <eos>       (bootstrap only: random words, see data.py)
    vqa      <bos> <img> t1 … t9 </img> <q> w1 … wn <a>   → yes|no
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIALS: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<gen>",
    "<img>",
    "</img>",
    "<q>",
    "<a>",
    "<dec>",
    "<sep>",
    "<write>",
    "yes",
    "no",
    "<copy>",
)


class JointVocab:
    """Maps between token strings / image-token indices and ids of the joint vocabulary.

    Args:
        words: the text vocabulary of the world (order matters: it fixes the ids).
        categories: prompt category names; each gets a ``<cat:NAME>`` token.
        num_image_tokens: size of the world's image-token alphabet.
    """

    def __init__(self, words: Sequence[str], categories: Sequence[str], num_image_tokens: int) -> None:
        if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
            raise TypeError("words: expected a sequence of non-empty strings")
        if isinstance(categories, str) or not all(isinstance(c, str) and c for c in categories):
            raise TypeError("categories: expected a sequence of non-empty strings")
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens: expected a positive int, got {num_image_tokens!r}")
        self.words: tuple[str, ...] = tuple(words)
        self.categories: tuple[str, ...] = tuple(categories)
        self.num_image_tokens = num_image_tokens
        tokens: list[str] = list(SPECIALS) + [self.category_token(c) for c in self.categories]
        seen = set(tokens)
        for w in self.words:
            if w not in seen:
                tokens.append(w)
                seen.add(w)
        self.text_tokens: tuple[str, ...] = tuple(tokens)
        self._id = {t: i for i, t in enumerate(tokens)}
        self.image_offset = len(tokens)
        self.size = self.image_offset + num_image_tokens
        # Ids of the special tokens, by name: vocab.pad, vocab.bos, ... vocab.img_close is "</img>".
        self.pad, self.bos, self.eos, self.unk = (self._id[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>"))
        self.gen, self.img, self.img_close = (self._id[t] for t in ("<gen>", "<img>", "</img>"))
        self.q, self.a, self.dec, self.sep, self.write = (
            self._id[t] for t in ("<q>", "<a>", "<dec>", "<sep>", "<write>")
        )
        self.yes, self.no, self.copy = self._id["yes"], self._id["no"], self._id["<copy>"]
        self.word_ids: tuple[int, ...] = tuple(self._id[w] for w in dict.fromkeys(self.words) if w not in SPECIALS)

    @staticmethod
    def category_token(category: str) -> str:
        """The token string that names a prompt category."""
        return f"<cat:{category}>"

    def __len__(self) -> int:
        return self.size

    def token_id(self, token: str) -> int:
        """Id of one text or special token; ValueError naming it if unknown."""
        try:
            return self._id[token]
        except KeyError:
            raise ValueError(f"token: {token!r} is not in the joint vocabulary") from None

    def encode_words(self, words: Sequence[str]) -> list[int]:
        """Ids of a list of text tokens (words or special tokens)."""
        if isinstance(words, str):
            raise TypeError("words: expected a list of tokens, got a str (tokenize the text first)")
        return [self.token_id(w) for w in words]

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        """Token strings of ids; image ids come back as ``<t:K>``."""
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.image_offset:
                out.append(self.text_tokens[i])
            elif self.image_offset <= i < self.size:
                out.append(f"<t:{i - self.image_offset}>")
            else:
                raise ValueError(f"ids: {i} is outside the joint vocabulary [0, {self.size})")
        return out

    def image_ids(self, image_tokens: Sequence[int]) -> list[int]:
        """Joint-vocabulary ids of image-token indices in [0, num_image_tokens)."""
        out = []
        for t in image_tokens:
            t = int(t)
            if not 0 <= t < self.num_image_tokens:
                raise ValueError(f"image_tokens: {t} is outside [0, {self.num_image_tokens})")
            out.append(self.image_offset + t)
        return out

    def is_image_id(self, i: int) -> bool:
        """True for ids that stand for image tokens."""
        return self.image_offset <= int(i) < self.size
