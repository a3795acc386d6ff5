"""Synthetic training data for the ShapesLMM bootstrap: the four text tasks as token sequences, and the feature
generation task of the continuous variant.

Every example is drawn fresh from the world's samplers (an unbounded stream, seeded). Generation, decomposition and
prompt-writing examples use **train** prompts only, so held-out attribute pairs are never asked for, written or
decomposed in training. VQA is the model's understanding data and, like the captioning data of real LMMs, covers
the whole world: questions about random scenes (any attribute combination) and the ground-truth questions of train
prompts about matching scenes and near misses.

Like web image-text data, the generation targets are imperfect: with probability ``gen_noise`` the target image of a
prompt is a near miss from ``corrupt_scene`` (a swapped attribute, a wrong relation, one object too many) instead of
a scene that meets the prompt. The VQA labels are always exact. This is what leaves the base model better at judging
compositions than at composing them.

VQA can come in balanced pairs (``vqa_pairs``, ``BootstrapConfig.vqa_pairs``): each question is asked of its scene
and of a second scene, one edit away where possible (an attribute changed, an object moved, removed or added), on
which the answer flips. A question then predicts nothing by itself, as in balanced VQA datasets: with unpaired
questions a model can answer from the questions' priors without reading the image (docs/results.md).

VQA examples can also carry count targets (``vqa_counts``, ``count_targets``): at every attribute, noun and relation
word of the question, the number of objects that fit the description read so far ("no", "one" … "four"). The answer
is one bit per item; these targets teach the lookup it rests on, word by word (docs/results.md).

The ``copy`` task stands in for the text pretraining of a real LMM: repeat a random sequence of the world's words.
Nothing in it can be predicted but by copying, so it trains the heads that copy words from the context, which
decomposition needs to repeat the prompt's nouns rather than the ones that usually follow its colors. Its sequences
never put an attribute before a shape of a held-out pair, so no held-out combination is seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from silmm_fast.loop.models.vocab import JointVocab
from silmm_fast.loop.world import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    TEXTURES,
    WORDS,
    ImageTokenizer,
    Prompt,
    Question,
    Scene,
    answer,
    canonical_scene,
    corrupt_scene,
    negative_questions,
    positive_questions,
    questions_for,
    random_edit,
    random_scene,
    sample_prompt,
    scene_for_prompt,
    tokenize_text,
)
from silmm_fast.loop.world.prompts import relation_holds

IGNORE = -100
_SHAPE_OF = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}  # shape word (singular or plural) -> shape
TASKS = ("write", "decompose", "vqa", "generate", "copy")


@dataclass(frozen=True)
class Example:
    """One token sequence; the loss covers the positions from ``target_start`` on (they are predicted from the
    tokens before them)."""

    ids: tuple[int, ...]
    target_start: int
    extra_targets: tuple[tuple[int, int], ...] = ()
    """(position, token) pairs before ``target_start``: the model at ``position`` is trained to predict ``token``
    instead of the next id (``count_targets`` of a VQA item)."""


def filter_counts(scene: Scene, question: Question) -> list[tuple[int, int]]:
    """How many objects of ``scene`` fit what ``question`` has said so far, at each word that narrows it down.

    Reading the question's words in order (``tokenize_text``), the objects in view start as the whole scene; an
    attribute or shape word keeps those fitting the description read so far (a shape word closes a description);
    a relation word ("left", "right", "above", "below") after the first description puts in view the objects that
    relation places next to one of that description's objects ("is the red circle to the left of" views the objects
    right of some red circle). Returns ``(word index, count)`` per such word. The last count decides the answer:
    > 0 for "is there …" and relation questions, == n for "exactly n …".
    """
    out: list[tuple[int, int]] = []
    in_view, partial, subjects = list(scene.objects), {}, None
    for i, w in enumerate(tokenize_text(question.text)):
        if w in RELATIONS and subjects is not None:
            in_view = [x for x in scene.objects if any(a is not x and relation_holds(a, w, x) for a in subjects)]
            out.append((i, len(in_view)))
            continue
        attr = "color" if w in COLORS else "texture" if w in TEXTURES else "shape" if w in _SHAPE_OF else None
        if attr is None:
            continue
        partial[attr] = _SHAPE_OF.get(w, w)
        fitting = [o for o in in_view if all(getattr(o, a) == x for a, x in partial.items())]
        out.append((i, len(fitting)))
        if attr == "shape":
            subjects = fitting if subjects is None else subjects
            partial = {}
    return out


def count_targets(vocab: JointVocab, scene: Scene, question: Question) -> list[tuple[int, int]]:
    """``filter_counts`` as (word index, target token): "no" for none, else the number word ("one" … "four")."""
    return [(i, vocab.no if n == 0 else vocab.token_id(NUMBER_WORDS[n - 1])) for i, n in filter_counts(scene, question)]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, T-1], labels [B, T-1]) for next-token training: ``labels[b, t]`` is the token
    after ``input_ids[b, t]`` when it is a target, else ``IGNORE``. Right padding needs no attention mask: causal
    attention keeps the pads, which come last, out of every real position."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, e.target_start : n] = ids[i, e.target_start : n]
        for position, token in e.extra_targets:
            labels[i, position + 1] = token
    return ids[:, :-1], labels[:, 1:]


class SyntheticData:
    """Seeded stream of training examples for every bootstrap task.

    Args:
        vocab: the model's joint vocabulary.
        gen_noise: fraction of generation targets replaced by a near miss (``corrupt_scene``), in [0, 1).
        distractor_prob: probability that a generation target carries one extra object the prompt does not mention.
        canonical_prob: probability that a generation target is laid out like ``canonical_scene`` (the prompt's
            objects in its first cells, in the order it names them) instead of at random cells.
        seed: seed of the stream.
        vqa_pairs: VQA items come in balanced pairs (the same question, a scene answering yes and one answering no,
            one edit apart where possible), consecutive in the stream.
        vqa_counts: VQA examples also train ``count_targets`` at the question's words: how many objects fit the
            description read so far (see the module docstring).
    """

    def __init__(
        self,
        vocab: JointVocab,
        gen_noise: float = 0.3,
        distractor_prob: float = 0.2,
        seed: int = 0,
        canonical_prob: float = 0.0,
        vqa_pairs: bool = False,
        vqa_counts: bool = False,
    ) -> None:
        if not isinstance(vocab, JointVocab):
            raise TypeError(f"vocab: expected a JointVocab, got {type(vocab).__name__}")
        for name, value, closed in (
            ("gen_noise", gen_noise, False),
            ("distractor_prob", distractor_prob, False),
            ("canonical_prob", canonical_prob, True),
        ):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not (0 <= value <= 1 if closed else 0 <= value < 1):
                raise ValueError(f"{name}: expected a number in [0, {'1]' if closed else '1)'}, got {value!r}")
        self.vocab = vocab
        self.gen_noise = float(gen_noise)
        self.distractor_prob = float(distractor_prob)
        self.canonical_prob = float(canonical_prob)
        if not isinstance(vqa_pairs, bool):
            raise TypeError(f"vqa_pairs: expected a bool, got {vqa_pairs!r}")
        self.vqa_pairs = vqa_pairs
        if not isinstance(vqa_counts, bool):
            raise TypeError(f"vqa_counts: expected a bool, got {vqa_counts!r}")
        self.vqa_counts = vqa_counts
        self._paired_item: tuple[Scene, Question, bool] | None = None
        self.rng = random.Random(seed)
        self.tokenizer = ImageTokenizer()

    def _text(self, text: str) -> list[int]:
        return self.vocab.encode_words(tokenize_text(text))

    def prompt(self) -> Prompt:
        """A random train prompt of a random category."""
        return sample_prompt(self.rng.choice(CATEGORIES), self.rng, "train")

    def _image(self, scene: Scene) -> list[int]:
        return self.vocab.image_ids(self.tokenizer.encode(scene))

    def write(self) -> Example:
        """Example: "<bos> <write> <cat:C>" → a train prompt of category C, then <eos>."""
        v = self.vocab
        p = self.prompt()
        head = [v.bos, v.write, v.token_id(v.category_token(p.category))]
        return Example((*head, *self._text(p.text), v.eos), len(head))

    def decompose(self) -> Example:
        """Example: "<bos> <dec> prompt <sep>" → its ground-truth questions separated by <sep>, then <eos>."""
        v = self.vocab
        p = self.prompt()
        head = [v.bos, v.dec, *self._text(p.text), v.sep]
        body: list[int] = []
        for i, q in enumerate(questions_for(p)):
            body += ([v.sep] if i else []) + self._text(q.text)
        return Example((*head, *body, v.eos), len(head))

    def target_scene(self, prompt: Prompt) -> Scene:
        """The (imperfect) generation target of ``prompt``: a matching scene (canonically laid out with probability
        ``canonical_prob``), or a near miss of it with probability ``gen_noise``."""
        if self.rng.random() < self.canonical_prob:
            scene = canonical_scene(prompt)
        else:
            distractors = 1 if self.rng.random() < self.distractor_prob else 0
            scene = scene_for_prompt(prompt, self.rng, distractors=distractors)
        if self.rng.random() < self.gen_noise:
            scene = corrupt_scene(prompt, scene, self.rng)
        return scene

    def generate_pair(self) -> tuple[str, Scene]:
        """(train prompt text, target scene) for feature generation.

        The feature head regresses one matrix per prompt, so its target is the prompt's ``canonical_scene`` (a
        random layout would teach it the mean of all layouts, which decodes to an empty grid), replaced by a near
        miss of it with probability ``gen_noise``."""
        p = self.prompt()
        scene = canonical_scene(p)
        if self.rng.random() < self.gen_noise:
            scene = corrupt_scene(p, scene, self.rng)
        return p.text, scene

    def generate(self) -> Example:
        """Example: "<bos> <gen> prompt <img>" → the nine image tokens of the target scene."""
        v = self.vocab
        p = self.prompt()
        text, scene = p.text, self.target_scene(p)
        head = [v.bos, v.gen, *self._text(text), v.img]
        return Example((*head, *self._image(scene)), len(head))

    def vqa_item(self) -> tuple[Scene, str, bool]:
        """(scene, question text, answer), yes and no equally likely. With ``vqa_pairs`` every other item asks the
        previous item's question of a scene on which its answer flips."""
        scene, question, yes = self.vqa_question()
        return scene, question.text, yes

    def vqa_question(self) -> tuple[Scene, Question, bool]:
        """``vqa_item`` with the ``Question`` itself (its constraint names the objects the question is about)."""
        if self._paired_item is not None:
            item, self._paired_item = self._paired_item, None
            return item
        while True:
            scene, question, yes = self._vqa_question()
            if not self.vqa_pairs:
                return scene, question, yes
            other = self._flipped_scene(scene, question, yes)
            if other is not None:
                self._paired_item = (other, question, not yes)
                return scene, question, yes

    def _vqa_question(self) -> tuple[Scene, Question, bool]:
        rng = self.rng
        want = rng.random() < 0.5
        if rng.random() < 0.5:
            p = self.prompt()
            scene = scene_for_prompt(p, rng, distractors=rng.randint(0, 1))
            if rng.random() < 0.5:
                scene = corrupt_scene(p, scene, rng)
            matching = [q for q in questions_for(p) if answer(q, scene) == want]
            if matching and scene.objects:
                return scene, rng.choice(matching), want
        else:
            scene = random_scene(rng)
        while True:
            make = positive_questions if want else negative_questions
            qs = make(scene, rng, 1)
            if qs:
                return scene, qs[0], want
            scene = random_scene(rng)

    def _flipped_scene(self, scene: Scene, question: Question, yes: bool, tries: int = 64) -> Scene | None:
        """A scene on which ``question`` is answered ``not yes``: mostly one random edit of ``scene``, else a random
        scene (None if ``tries`` draws find none)."""
        for _ in range(tries):
            other = random_edit(scene, self.rng) if self.rng.random() < 0.8 else random_scene(self.rng)
            if other is not None and answer(question, other) != yes:
                return other
        return None

    def vqa(self) -> Example:
        """Example: "<bos> <img> tokens </img> <q> question <a>" → yes / no; with ``vqa_counts`` also the
        ``count_targets`` at the question's words."""
        v = self.vocab
        scene, question, yes = self.vqa_question()
        text = self._text(question.text)
        head = [v.bos, v.img, *self._image(scene), v.img_close, v.q, *text, v.a]
        first_word = len(head) - len(text) - 1
        extra = tuple((first_word + i, t) for i, t in count_targets(v, scene, question)) if self.vqa_counts else ()
        return Example((*head, v.yes if yes else v.no), len(head), extra)

    def copy(self) -> Example:
        """Example: "<bos> <copy> w1 … wn <sep>" → w1 … wn <eos>, 4 to 16 random words of the world, never an
        attribute one or two words before a shape (or plural) of a held-out pair."""
        v, rng = self.vocab, self.rng
        words: list[str] = []
        for _ in range(rng.randint(4, 16)):
            while True:
                w = rng.choice(WORDS)
                shape = _SHAPE_OF.get(w)
                if shape is None or not any((shape, a) in HELDOUT_PAIRS for a in words[-2:]):
                    break
            words.append(w)
        ids = v.encode_words(words)
        head = [v.bos, v.copy, *ids, v.sep]
        return Example((*head, *ids, v.eos), len(head))

    def batch(self, task: str, n: int) -> list[Example]:
        """``n`` examples of ``task`` (one of ``TASKS``)."""
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        make = getattr(self, task)
        return [make() for _ in range(n)]
