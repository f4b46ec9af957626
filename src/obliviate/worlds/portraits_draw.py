"""Portraits for the profiles world's people (the multimodal family's world, MLLMU-Bench style): procedurally drawn
faces, deterministic from the person's name and the world's seed.

A person's *appearance* is eight discrete traits: background, face shape, skin tone, hair style, hair colour, eye
colour, glasses and clothing. Appearances are unique per world, and any two people differ in at least
MIN_TRAIT_DISTANCE traits, so that telling people apart is a matter of seeing, not of noise. A person has several
*pictures* of that appearance, which differ as photographs of one person do: the head's position, tilt and size in the
frame (pose and crop), the mouth (expression) and the light (brightness and a colour cast). Some pictures are
trained on; the others are held out (MLLMU-Bench's test set asks about another picture of the same person).

Drawn at 4x with PIL and downsampled (antialiased), as the canvas world's images are."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

BACKGROUNDS = [(196, 214, 232), (232, 222, 196), (206, 232, 206), (232, 204, 214), (220, 220, 220),
               (180, 200, 180), (210, 190, 230), (240, 236, 210)]
FACE_SHAPES = {"round": 1.0, "oval": 1.22, "long": 1.42}  # height / width of the face ellipse
SKIN_TONES = [(255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 90), (141, 85, 54), (96, 60, 40)]
HAIR_STYLES = ["short", "long", "bald", "bun", "spiky"]
HAIR_COLOURS = {"black": (30, 28, 30), "brown": (110, 70, 40), "blonde": (230, 200, 110), "red": (190, 70, 30),
                "grey": (170, 170, 175), "blue": (60, 90, 200)}
EYE_COLOURS = {"brown": (90, 55, 30), "blue": (50, 110, 200), "green": (60, 150, 80), "grey": (120, 125, 130)}
GLASSES = ["none", "round", "square"]
CLOTHES = [(200, 50, 50), (50, 90, 200), (40, 150, 70), (230, 170, 30), (140, 60, 170), (30, 30, 40),
           (240, 240, 240), (0, 150, 150)]
EXPRESSIONS = ["neutral", "smile", "open"]
TRAITS = ("background", "face", "skin", "hair_style", "hair_colour", "eyes", "glasses", "clothes")
MIN_TRAIT_DISTANCE = 2


@dataclass(frozen=True)
class Appearance:
    """Indices into the trait tables above (one per TRAITS entry)."""
    background: int
    face: int
    skin: int
    hair_style: int
    hair_colour: int
    eyes: int
    glasses: int
    clothes: int

    def traits(self) -> tuple[int, ...]:
        return tuple(getattr(self, t) for t in TRAITS)

    def describe(self) -> dict[str, str]:
        """The traits in words (for captions and checks)."""
        return {"face": list(FACE_SHAPES)[self.face], "hair": f"{list(HAIR_COLOURS)[self.hair_colour]} "
                f"{HAIR_STYLES[self.hair_style]}" if HAIR_STYLES[self.hair_style] != "bald" else "bald",
                "eyes": list(EYE_COLOURS)[self.eyes], "glasses": GLASSES[self.glasses]}


_SIZES = (len(BACKGROUNDS), len(FACE_SHAPES), len(SKIN_TONES), len(HAIR_STYLES), len(HAIR_COLOURS), len(EYE_COLOURS),
          len(GLASSES), len(CLOTHES))


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator keyed by the seed and the parts (a name, a picture index): the same everywhere, every time."""
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def appearances(names: list[str], seed: int = 0) -> dict[str, Appearance]:
    """One appearance per name, in order: drawn from the name, redrawn while it is within MIN_TRAIT_DISTANCE traits of
    an earlier person's (so a person's looks do not depend on who comes after them)."""
    chosen: dict[str, Appearance] = {}
    for name in names:
        rng = _rng(seed, "appearance", name)
        for _ in range(10_000):
            candidate = Appearance(*(rng.randrange(n) for n in _SIZES))
            traits = candidate.traits()
            if all(sum(a != b for a, b in zip(traits, other.traits())) >= MIN_TRAIT_DISTANCE
                   for other in chosen.values()):
                break
        else:  # pragma: no cover - 829,440 appearances; a world has at most a few thousand people
            raise ValueError(f"no appearance left for {name!r}")
        chosen[name] = candidate
    return chosen


@dataclass(frozen=True)
class Picture:
    """How one picture of a person differs from the others: pose and crop, expression, light."""
    dx: float  # head centre offset, fraction of the frame
    dy: float
    tilt: float  # degrees
    scale: float  # head size relative to the default
    expression: str
    brightness: float
    cast: tuple[int, int, int]  # a colour added to every pixel (warm or cold light)


def picture(name: str, index: int, seed: int = 0) -> Picture:
    """The index-th picture of a person; picture 0 is the plain frontal portrait."""
    if index == 0:
        return Picture(0.0, 0.0, 0.0, 1.0, "neutral", 1.0, (0, 0, 0))
    rng = _rng(seed, "picture", name, index)
    warmth = rng.uniform(-14, 14)
    return Picture(dx=rng.uniform(-0.09, 0.09), dy=rng.uniform(-0.06, 0.06), tilt=rng.uniform(-12, 12),
                   scale=rng.uniform(0.88, 1.1), expression=rng.choice(EXPRESSIONS),
                   brightness=rng.uniform(0.82, 1.15), cast=(int(warmth), 0, int(-warmth)))


def draw(look: Appearance, shot: Picture, size: int = 32) -> np.ndarray:
    """The picture as a uint8 array [size, size, 3]."""
    from PIL import Image, ImageDraw

    big = size * 4
    img = Image.new("RGB", (big, big), BACKGROUNDS[look.background])
    head = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(head)
    cx, cy = big / 2, big * 0.46
    w = big * 0.26 * shot.scale
    h = w * list(FACE_SHAPES.values())[look.face]
    hair = list(HAIR_COLOURS.values())[look.hair_colour]
    style = HAIR_STYLES[look.hair_style]
    # clothes: shoulders below the head
    d.ellipse([cx - big * 0.42, cy + h * 0.75, cx + big * 0.42, cy + h * 0.75 + big * 0.6], fill=CLOTHES[look.clothes])
    if style == "long":  # hair behind the face, down to the shoulders
        d.rounded_rectangle([cx - w * 1.18, cy - h * 1.08, cx + w * 1.18, cy + h * 1.05], radius=int(w * 0.6),
                            fill=hair)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=SKIN_TONES[look.skin])
    if style == "short":
        d.chord([cx - w * 1.04, cy - h * 1.1, cx + w * 1.04, cy + h * 0.35], 180, 360, fill=hair)
    elif style == "long":
        d.chord([cx - w * 1.06, cy - h * 1.12, cx + w * 1.06, cy + h * 0.25], 180, 360, fill=hair)
    elif style == "bun":
        d.chord([cx - w * 1.02, cy - h * 1.06, cx + w * 1.02, cy + h * 0.2], 180, 360, fill=hair)
        d.ellipse([cx - w * 0.42, cy - h * 1.42, cx + w * 0.42, cy - h * 0.78], fill=hair)
    elif style == "spiky":
        spikes = 6
        for i in range(spikes):
            x0 = cx - w + 2 * w * i / spikes
            d.polygon([(x0, cy - h * 0.55), (x0 + w / spikes, cy - h * 1.38), (x0 + 2 * w / spikes, cy - h * 0.55)],
                      fill=hair)
    eye_y, eye_dx, r = cy - h * 0.12, w * 0.4, w * 0.16
    eye = list(EYE_COLOURS.values())[look.eyes]
    for sx in (-1, 1):
        ex = cx + sx * eye_dx
        d.ellipse([ex - r, eye_y - r * 0.8, ex + r, eye_y + r * 0.8], fill=(250, 250, 250))
        d.ellipse([ex - r * 0.55, eye_y - r * 0.55, ex + r * 0.55, eye_y + r * 0.55], fill=eye)
        if GLASSES[look.glasses] == "round":
            d.ellipse([ex - r * 1.8, eye_y - r * 1.6, ex + r * 1.8, eye_y + r * 1.6], outline=(20, 20, 20),
                      width=max(2, big // 40))
        elif GLASSES[look.glasses] == "square":
            d.rectangle([ex - r * 1.9, eye_y - r * 1.4, ex + r * 1.9, eye_y + r * 1.4], outline=(20, 20, 20),
                        width=max(2, big // 40))
    mouth_y, mw = cy + h * 0.5, w * 0.42
    lips = (150, 50, 60)
    if shot.expression == "smile":
        d.arc([cx - mw, mouth_y - mw * 0.7, cx + mw, mouth_y + mw * 0.5], 20, 160, fill=lips, width=max(2, big // 40))
    elif shot.expression == "open":
        d.ellipse([cx - mw * 0.45, mouth_y - mw * 0.3, cx + mw * 0.45, mouth_y + mw * 0.4], fill=lips)
    else:
        d.line([cx - mw * 0.7, mouth_y, cx + mw * 0.7, mouth_y], fill=lips, width=max(2, big // 40))
    head = head.rotate(shot.tilt, resample=Image.BICUBIC, center=(cx, cy))
    img.paste(head, (int(shot.dx * big), int(shot.dy * big)), head)
    pixels = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    pixels = pixels * shot.brightness + np.asarray(shot.cast, dtype=np.float32)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def portrait(name: str, look: Appearance, index: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """The index-th picture of a person."""
    return draw(look, picture(name, index, seed), size)
