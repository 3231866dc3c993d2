"""Write docs/configuration.md from the config model's own field descriptions (launcher/config.py).

python scripts/config_reference.py           # rewrite docs/configuration.md
python scripts/config_reference.py --check   # exit 1 when the file differs from the model (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.config import Config

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from the field descriptions in `launcher/config.py` by `python scripts/config_reference.py`; a test
fails when this file and the model disagree. Every key can be set in the YAML file or on the command line as
`dotted.key=value` (precedence: defaults < YAML < overrides). `ftl validate CONFIG` prints the resolved config;
unknown keys, wrong types and impossible combinations are reported together with exit code 2.
"""


def _section(annotation: object) -> type[BaseModel] | None:
    """The config section a field holds (a nested model, or an optional one: `Section | None`), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = found[0] if len(found) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _type_name(annotation: object) -> str:
    """A short, readable type: `int`, `str | None`, `fsdp | deepspeed` for literals."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _default(field: object) -> str:
    default = field.default  # type: ignore[attr-defined]
    if default is PydanticUndefined:
        factory = field.default_factory  # type: ignore[attr-defined]
        if factory is None:
            return "required"
        default = factory()
    if isinstance(default, BaseModel):
        return "(section)"
    return f"`{json.dumps(default)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field, sections expanded in order."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _section(field.annotation)
        if nested is not None:
            out += rows(nested, f"{key}.")
            continue
        text = (field.description or "").replace("|", "\\|")
        out.append((key, _type_name(field.annotation), _default(field), text))
    return out


def render() -> str:
    """The whole reference, one table per top-level section."""
    parts = [HEADER]
    for name, field in Config.model_fields.items():
        nested = _section(field.annotation)
        if nested is None:
            parts.append(f"## `{name}`\n\n{field.description or ''}\n\nDefault: {_default(field)}\n")
            continue
        lines = [f"## `{name}`\n"] + ([f"{field.description}\n"] if field.description else [])
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in rows(nested, f"{name}.")]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main() -> int:
    """Rewrite the reference, or with --check say whether it is current."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = p.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
