"""Person names as C-FIND and the admin filters match them: case-insensitive in
every script, whatever form of Unicode the sender used."""

import unicodedata


def fold_name(name: str | None) -> str | None:
    """`name` in the one form that its other cases and spellings share: Unicode
    case folding between canonical decompositions (a canonical caseless match,
    Unicode 3.13), recomposed (NFC) so that `?` stays one accented letter.
    ``Test-Éü`` and ``TEST-ÉÜ`` (as composed or decomposed code points) both give
    ``test-éü``; ``Straße`` gives ``strasse``; ``ΣΊΣΥΦΟΣ`` gives ``σίσυφοσ``."""
    if name is None:
        return None
    if name.isascii():  # most names: the same result, a tenth of the time
        return name.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())
