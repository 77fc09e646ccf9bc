"""Seeds derived from names: every random stream of the library (a zoo network's initialization and
data order, a synthetic task, a NameData split) is seeded from a tuple such as
``("ffl-zoo-init", seed, task, run)``, so it does not depend on process, platform, chunking or
sharding (unlike Python's ``hash``)."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: object, sep: str = "/") -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of the SHA-256 of the parts joined by
    ``sep``. Zoos join with ``":"`` and datasets with ``"/"``, as they always have, so that stored
    zoos and generated tasks stay byte-identical."""
    digest = hashlib.sha256(sep.join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
