"""Load and check a message schema (TOML) before anything is generated.

A schema names its two parties (`caller` sends calls, `callee` answers),
enums, structs and messages.  Every rule that the generated code relies on
is checked here, so a broken schema fails `make gen` with a clear line
instead of producing broken code.

Types: the primitives below, an enum or struct of the schema, and three
ways to combine them: `T?` (T or nothing), `[T]` (a list of T), `{T}` (a
map from strings to T).  A field is `[name, type, doc]` or `[name, type,
doc, {options}]`; the options are `default` (the field may be left out),
`min`/`max`, `pattern` (with `rule`, the sentence an error quotes),
`choices`, `multiple_of` and `max_len`.

`encoding = "list"` (the default) sends a struct or a message's arguments
as a list in field order: compact, for the hot helper and runner RPCs.
`encoding = "map"` sends them as maps keyed by field name, so a receiver
can refuse an unknown field or name a missing one: for the control API
and the handshake between daemons, whose messages people and other
programs build.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

INT_RANGES = {
    "u8": (0, 2**8 - 1),
    "u16": (0, 2**16 - 1),
    "u32": (0, 2**32 - 1),
    "u64": (0, 2**64 - 1),
    "i64": (-(2**63), 2**63 - 1),
}
PRIMITIVES = {
    **{t: "int" for t in INT_RANGES},
    "f64": "float",
    "bool": "bool",
    "str": "str",
    "bytes": "bytes",
    "scalar": "int | float | str | bool",
}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TYPE_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
OPTIONS = {"default", "min", "max", "pattern", "rule", "choices", "multiple_of", "max_len"}


class SchemaError(Exception):
    pass


@dataclass(frozen=True)
class Type:
    """A parsed type: kind is 'prim', 'enum', 'struct', 'opt', 'list' or 'map'."""

    kind: str
    name: str = ""
    inner: Type | None = None

    def __str__(self) -> str:
        if self.kind == "opt":
            return f"{self.inner}?"
        if self.kind == "list":
            return f"[{self.inner}]"
        if self.kind == "map":
            return f"{{{self.inner}}}"
        return self.name


@dataclass
class Field:
    name: str
    type: Type
    doc: str = ""
    options: dict = field(default_factory=dict)

    @property
    def has_default(self) -> bool:
        return "default" in self.options or self.type.kind == "opt"

    @property
    def default(self):
        return self.options.get("default")


@dataclass
class Message:
    name: str
    id: int
    doc: str
    args: list[Field]
    reply: Type | None
    applies: str
    passes_fd: bool
    waits: bool  # the sender blocks for a reply (an empty one when `reply` is None)
    direction: str  # "caller->callee" (or the reverse)

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


@dataclass
class Schema:
    path: Path
    name: str
    title: str
    caller: str
    callee: str
    outputs: dict
    encoding: str = "list"
    intro: str = ""
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    enum_docs: dict[str, str] = field(default_factory=dict)
    structs: dict[str, list[Field]] = field(default_factory=dict)
    struct_docs: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    # structs defined by another schema: name -> (its models module, its docs file)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return f"{self.caller}->{self.callee}"

    @property
    def reverse_direction(self) -> str:
        return f"{self.callee}->{self.caller}"

    def calls(self, direction: str) -> list[Message]:
        return [m for m in self.messages if m.direction == direction]


def load(path: Path) -> Schema:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"{path}: {exc}") from None
    head = raw.get("schema", {})
    for key in ("name", "title", "caller", "callee"):
        if key not in head:
            raise SchemaError(f"{path}: [schema] needs '{key}'")
    schema = Schema(
        path,
        head["name"],
        head["title"],
        head["caller"],
        head["callee"],
        raw.get("outputs", {}),
        head.get("encoding", "list"),
        head.get("intro", ""),
    )
    if schema.encoding not in ("list", "map"):
        raise SchemaError(f"{path}: encoding is 'list' or 'map'")
    for key in ("models", "docs"):
        if key not in schema.outputs:
            raise SchemaError(f"{path}: [outputs] needs '{key}'")

    for name, body in raw.get("enums", {}).items():
        _type_name(path, name)
        body = dict(body)
        schema.enum_docs[name] = body.pop("doc", "")
        if not body or not all(isinstance(v, int) for v in body.values()):
            raise SchemaError(f"{path}: enum {name} needs integer members")
        schema.enums[name] = body
    raw_structs = raw.get("structs", {})
    for name in raw_structs:
        _type_name(path, name)
    for other_path, names in raw.get("imports", {}).items():
        other = load(path.parent.parent / other_path)
        for name in names:
            if name not in other.structs:
                raise SchemaError(f"{path}: {other_path} has no struct {name!r} to import")
            module = other.outputs["models"].removesuffix(".py").replace("/", ".")
            schema.imports[name] = (module, other.outputs["docs"])
    known = set(PRIMITIVES) | set(schema.enums) | set(raw_structs) | set(schema.imports)
    for name, body in raw_structs.items():
        schema.struct_docs[name] = body.get("doc", "")
        schema.structs[name] = [
            _field(path, schema, f"{name}.{f[0]}", f, known) for f in body["fields"]
        ]

    ids: dict[int, str] = {}
    for name, body in raw.get("messages", {}).items():
        if not NAME.match(name):
            raise SchemaError(f"{path}: message name {name!r} must be snake_case")
        msg_id = body.get("id")
        if not isinstance(msg_id, int) or not 0 < msg_id < 2**16:
            raise SchemaError(f"{path}: message {name} needs an explicit id in 1..65535")
        if msg_id in ids:
            raise SchemaError(f"{path}: messages {ids[msg_id]} and {name} share id {msg_id}")
        ids[msg_id] = name
        args = [_field(path, schema, f"{name}.{a[0]}", a, known) for a in body.get("args", [])]
        if schema.encoding == "list" and any(a.has_default for a in args):
            raise SchemaError(f"{path}: {name}: defaults need encoding = 'map'")
        reply = body.get("reply")
        reply_type = None
        if reply is not None:
            reply_type = _resolve_enums(parse_type(path, f"{name} reply", reply, known), schema)
        applies = body.get("applies", "any")
        if applies not in ("save", "restore", "both", "any"):
            raise SchemaError(f"{path}: message {name}: applies must be save, restore or both")
        waits = body.get("waits", reply is not None or head.get("always_wait", False))
        if reply is not None and not waits:
            raise SchemaError(f"{path}: message {name} has a reply, so its sender waits")
        passes_fd = bool(body.get("passes_fd"))
        doc = body.get("doc", "")
        direction = body.get("direction", schema.direction)
        if direction not in (schema.direction, schema.reverse_direction):
            raise SchemaError(
                f"{path}: message {name}: direction must be {schema.direction} or "
                f"{schema.reverse_direction}"
            )
        schema.messages.append(
            Message(name, msg_id, doc, args, reply_type, applies, passes_fd, waits, direction)
        )
    schema.messages.sort(key=lambda m: m.id)
    for m in schema.messages:
        if m.class_name in schema.structs or m.class_name in schema.enums:
            raise SchemaError(f"{path}: message {m.name}'s class {m.class_name} is also a type")
    return schema


def parse_type(path: Path, where: str, text: str, known: set[str]) -> Type:
    text = text.strip()
    if text.endswith("?"):
        inner = parse_type(path, where, text[:-1], known)
        if inner.kind == "opt":
            raise SchemaError(f"{path}: {where}: '??' is not a type")
        return Type("opt", inner=inner)
    if text.startswith("[") and text.endswith("]"):
        return Type("list", inner=parse_type(path, where, text[1:-1], known))
    if text.startswith("{") and text.endswith("}"):
        return Type("map", inner=parse_type(path, where, text[1:-1], known))
    if text not in known:
        raise SchemaError(f"{path}: {where} has unknown type {text!r}")
    kind = "prim" if text in PRIMITIVES else "struct" if TYPE_NAME.match(text) else "prim"
    return Type(kind, text)


def _type_name(path: Path, name: str) -> None:
    if not TYPE_NAME.match(name):
        raise SchemaError(f"{path}: type name {name!r} must be CamelCase")


def _field(path: Path, schema: Schema, where: str, spec: list, known: set[str]) -> Field:
    if not 2 <= len(spec) <= 4:
        raise SchemaError(f"{path}: field {where} is [name, type, doc, {{options}}]")
    name, type_text = spec[0], spec[1]
    doc = spec[2] if len(spec) > 2 else ""
    options = dict(spec[3]) if len(spec) > 3 else {}
    if not NAME.match(name):
        raise SchemaError(f"{path}: field {where} must be snake_case")
    ftype = _resolve_enums(parse_type(path, where, type_text, known), schema)
    unknown = set(options) - OPTIONS
    if unknown:
        raise SchemaError(f"{path}: field {where}: unknown option {sorted(unknown)[0]!r}")
    if "pattern" in options:
        re.compile(options["pattern"])
        if "rule" not in options:
            raise SchemaError(f"{path}: field {where}: a pattern needs a 'rule' sentence")
    if "default" in options and ftype.kind in ("struct", "enum"):
        raise SchemaError(f"{path}: field {where}: struct and enum fields have no default")
    return Field(name, ftype, doc, options)


def _resolve_enums(t: Type, schema: Schema) -> Type:
    if t.kind == "struct" and t.name in schema.enums:
        return Type("enum", t.name)
    if t.inner is not None:
        return Type(t.kind, t.name, _resolve_enums(t.inner, schema))
    return t
