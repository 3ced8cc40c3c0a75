"""Load and check a message schema (TOML) before anything is generated.

A schema names its two parties (`caller` sends calls, `callee` answers),
enums, structs and messages.  Every rule that the generated code relies on
is checked here, so a broken schema fails `make gen` with a clear line
instead of producing broken code.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# wire type -> (python annotation, check call template or None)
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
}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TYPE_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")


class SchemaError(Exception):
    pass


@dataclass
class Field:
    name: str
    type: str
    doc: str = ""


@dataclass
class Message:
    name: str
    id: int
    doc: str
    args: list[Field]
    reply: str | None
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
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    enum_docs: dict[str, str] = field(default_factory=dict)
    structs: dict[str, list[Field]] = field(default_factory=dict)
    struct_docs: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)

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
        path, head["name"], head["title"], head["caller"], head["callee"], raw.get("outputs", {})
    )
    for key in ("models", "stubs", "dispatch", "docs"):
        if key not in schema.outputs:
            raise SchemaError(f"{path}: [outputs] needs '{key}'")

    for name, body in raw.get("enums", {}).items():
        _type_name(path, name)
        body = dict(body)
        schema.enum_docs[name] = body.pop("doc", "")
        if not body or not all(isinstance(v, int) for v in body.values()):
            raise SchemaError(f"{path}: enum {name} needs integer members")
        schema.enums[name] = body
    for name, body in raw.get("structs", {}).items():
        _type_name(path, name)
        schema.struct_docs[name] = body.get("doc", "")
        schema.structs[name] = [Field(*f) for f in body["fields"]]

    known = set(PRIMITIVES) | set(schema.enums) | set(schema.structs)
    for struct, fields in schema.structs.items():
        for f in fields:
            _field(path, f"{struct}.{f.name}", f, known)

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
        args = [Field(*a) for a in body.get("args", [])]
        for a in args:
            _field(path, f"{name}.{a.name}", a, known)
        reply = body.get("reply")
        if reply is not None and reply not in known:
            raise SchemaError(f"{path}: message {name} replies with unknown type {reply!r}")
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
            Message(name, msg_id, doc, args, reply, applies, passes_fd, waits, direction)
        )
    schema.messages.sort(key=lambda m: m.id)
    return schema


def _type_name(path: Path, name: str) -> None:
    if not TYPE_NAME.match(name):
        raise SchemaError(f"{path}: type name {name!r} must be CamelCase")


def _field(path: Path, where: str, f: Field, known: set[str]) -> None:
    if not NAME.match(f.name):
        raise SchemaError(f"{path}: field {where} must be snake_case")
    if f.type not in known:
        raise SchemaError(f"{path}: field {where} has unknown type {f.type!r}")
