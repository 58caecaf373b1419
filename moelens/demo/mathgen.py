"""The math domain: arithmetic worksheets generated from a seeded ``random.Random``.

Generated text is the one source that is identical on every machine. Its "input hash" is the hash of the
generator's parameters, so a change to the templates without a new version shows up as a test failure
instead of being skipped as "different sources".
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from fractions import Fraction

from moelens.demo.documents import Document, DomainDocs

#: Bump when a template changes: the shipped corpus must then be rebuilt.
GENERATOR_VERSION = 1
MATH_SEED = 7
MATH_TOTAL_CHARS = 900_000
PROBLEMS_PER_SHEET = 60


def _add(r: random.Random) -> str:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return f"{a} + {b} = {a + b}"


def _sub(r: random.Random) -> str:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return f"{a} - {b} = {a - b}"


def _mul(r: random.Random) -> str:
    a, b = r.randint(2, 99), r.randint(2, 99)
    return f"{a} * {b} = {a * b}"


def _divmod(r: random.Random) -> str:
    a, c = r.randint(10, 9999), r.randint(2, 99)
    q, rem = divmod(a, c)
    return f"{a} / {c} = {q} remainder {rem}"


def _paren(r: random.Random) -> str:
    a, b, c = r.randint(1, 99), r.randint(1, 99), r.randint(2, 20)
    return f"({a} + {b}) * {c} = {(a + b) * c}"


def _gcd(r: random.Random) -> str:
    g = r.randint(1, 30)
    a, b = g * r.randint(1, 40), g * r.randint(1, 40)
    return f"gcd({a}, {b}) = {math.gcd(a, b)}"


def _linear(r: random.Random) -> str:
    m, x, q = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
    sign = "+" if q >= 0 else "-"
    return f"Solve {m}x {sign} {abs(q)} = {m * x + q}: x = {x}"


def _powers(r: random.Random) -> str:
    n = r.randint(2, 40)
    return f"{n}^2 = {n * n}, {n}^3 = {n**3}"


def _fractions(r: random.Random) -> str:
    a, b = r.randint(1, 9), r.randint(2, 12)
    c, d = r.randint(1, 9), r.randint(2, 12)
    s = Fraction(a, b) + Fraction(c, d)
    return f"{a}/{b} + {c}/{d} = {s.numerator}/{s.denominator}"


TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _add,
    _sub,
    _mul,
    _divmod,
    _paren,
    _gcd,
    _linear,
    _powers,
    _fractions,
)


def _params_hash() -> str:
    params = {
        "version": GENERATOR_VERSION,
        "seed": MATH_SEED,
        "chars": MATH_TOTAL_CHARS,
        "per_sheet": PROBLEMS_PER_SHEET,
        "templates": [t.__name__ for t in TEMPLATES],
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def math_docs() -> DomainDocs:
    """Worksheets of 60 problems each (one problem per line) until about 900 K characters."""
    rng = random.Random(MATH_SEED)
    docs: list[Document] = []
    total = 0
    while total < MATH_TOTAL_CHARS:
        lines = [rng.choice(TEMPLATES)(rng) for _ in range(PROBLEMS_PER_SHEET)]
        text = "\n".join(lines) + "\n"
        docs.append(Document(f"sheet-{len(docs):04d}", "math", f"moelens mathgen v{GENERATOR_VERSION}", "own", text))
        total += len(text)
    return DomainDocs("math", f"seeded arithmetic (seed {MATH_SEED}, v{GENERATOR_VERSION})", _params_hash(), docs)
