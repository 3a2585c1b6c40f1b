"""Selectors, benchopt's `name[k=v,...]`: `partial[depth=1,2,3]`,
`two_stage[depth=2,lr_scale=0.1,0.01]`, `pretrained:digits_a[epochs=20]`'s body. Read by
bench/config/spec.py (and grid.py through it) and bench/config/pretrained.py; imports
nothing of the harness."""

from __future__ import annotations


def parse_value(text: str) -> object:
    """A strategy parameter from its string form: int, float, bool or str."""
    if text in ("true", "false"):
        return text == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


class SelectorError(ValueError):
    pass


def parse_selector(text: str) -> tuple[str, dict[str, list[object]]]:
    """`name[k=v1,v2,k2=v3]` -> ('name', {'k': [v1, v2], 'k2': [v3]}).

    A comma-separated token without '=' is one more value of the previous key, so
    `partial[depth=1,2,3]` sweeps three depths (benchopt's selector syntax).
    """
    text = text.strip()
    if "[" not in text:
        if "]" in text or not text:
            raise SelectorError(f"malformed selector {text!r}")
        return text, {}
    if not text.endswith("]") or text.count("[") != 1:
        raise SelectorError(f"malformed selector {text!r}: expected name[key=value,...]")
    name, body = text[:-1].split("[", 1)
    if "[" in body or "]" in body:
        raise SelectorError(f"malformed selector {text!r}: stray bracket")
    values: dict[str, list[object]] = {}
    key = None
    for token in (t.strip() for t in body.split(",")):
        if not token:
            continue
        if "=" in token:
            key, val = (s.strip() for s in token.split("=", 1))
            if not key:
                raise SelectorError(f"malformed selector {text!r}: empty key")
            values.setdefault(key, [])
        elif key is None:
            raise SelectorError(f"malformed selector {text!r}: value {token!r} has no key")
        else:
            val = token
        values[key].append(parse_value(val))
    return name.strip(), values
