"""Refuse a big request whose JSON objects (google.protobuf.Struct) would take seconds to decode.

protobuf's decoder (upb, the C implementation behind the Python package) fills a map in time
that grows faster than its size: measured here (2 vCPUs), one Struct of 100,000 keys decodes
in ~0.04 s, 400,000 in 0.6-1.0 s, 800,000 in ~4 s under load, 1,500,000 in 0.7-16 s (the key
lengths and the machine's load moved it that much), and all that time the decoder holds the
GIL, so a thread does not help: one request froze its worker (every call on it, health checks
included).
The same bytes spread over many small Structs decode in linear time (~10-20 ns a byte).

So a request over `MAX_STRUCT_BYTES` is first decoded as a shadow of its type that keeps only
the fields on the way to a Struct, each Struct (and Value, ListValue) field declared as an
empty message `Blob`: its bytes are kept as the Blob's unknown fields (linear, no map is built)
and each Struct's encoded size is checked: over `MAX_STRUCT_BYTES`, INVALID_REQUEST naming the
field, before the real decode. A smaller request cannot hold a bigger Struct, so it is never
shadowed. A Struct's nested objects are inside its bytes, so its own bound bounds them too.

Why a Blob and not `bytes`: protobuf merges the occurrences of a singular message field, so a
caller can send one Struct as many pieces, each under the bound, that the real decode merges into
one huge map; a `bytes` field keeps only the last piece, a Blob merges them as the Struct would
(its unknown fields are the pieces' bytes one after the other). The fields off the way to a Struct
are left out of the shadow (unknown to it, skipped over without being decoded): decoding 64 MB of
small messages twice cost 3 s more than decoding them once.

The shadow is never stricter than the real type (a Blob takes any bytes a Struct takes, a left-out
field any bytes the real one takes), so bytes it cannot decode do not decode as the real type
either: `DecodeError` then, and the real decode, which would fill a huge Struct before reaching
the bad byte, is never run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from server.errors import FieldViolation

# A function's parameters or a response schema of 1 MiB is far beyond any real one (OpenAI
# limits a strict schema to 15,000 characters of property names and enums); a map that size
# decodes in ~0.03 s.
MAX_STRUCT_BYTES = 1024 * 1024
# Items of a repeated field on the way to a Struct that are checked one by one; past it the
# request is refused (CreateRequest's only such field is `functions`, at most 1,000 anyway).
MAX_CHECKED_ITEMS = 1_000

# The well-known types that hold a map (a Value or ListValue can hold a Struct).
_BOUNDED = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})
_SHADOW_PACKAGE = "llmgateway_struct_shadow"
_BLOB_FILE = "llmgateway_struct_shadow/blob.proto"
_BLOB = f".{_SHADOW_PACKAGE}.Blob"


def oversized_structs(message_type: type[Message], data: bytes) -> list[FieldViolation]:
    """The violations of a request of `message_type` encoded as `data` (empty when none).

    Raises `DecodeError` when `data` does not decode (nor would it as `message_type`).
    """
    if len(data) <= MAX_STRUCT_BYTES:
        return []
    paths = _struct_paths(message_type.DESCRIPTOR)
    if not paths:
        return []
    shadow = _shadow_class(message_type.DESCRIPTOR)()
    try:
        shadow.ParseFromString(data)  # linear: no map in it
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DecodeError(str(exc)) from exc
    return list(_violations(shadow, paths, ""))


Paths = tuple[tuple[str, bool, Any], ...]  # (field name, repeated, sub-paths or None for a Struct)


@functools.cache
def _struct_paths(descriptor: Descriptor) -> Paths:
    """The fields of `descriptor` that are, or lead to, a Struct (not into a Struct's own fields)."""
    return _paths(descriptor, frozenset())


def _paths(descriptor: Descriptor, seen: frozenset[str]) -> Paths:
    out: list[tuple[str, bool, Any]] = []
    for field in descriptor.fields:
        sub = field.message_type
        if sub is None:
            continue
        if sub.full_name in _BOUNDED:
            out.append((field.name, field.is_repeated, None))
        elif sub.full_name not in seen and not sub.full_name.startswith("google.protobuf."):
            below = _paths(sub, seen | {descriptor.full_name})
            if below:
                out.append((field.name, field.is_repeated, below))
    return tuple(out)


def _violations(message: Any, paths: Paths, prefix: str) -> Iterator[FieldViolation]:
    for name, repeated, below in paths:
        if repeated:
            items = getattr(message, name)
            if len(items) > MAX_CHECKED_ITEMS:
                yield FieldViolation(f"{prefix}{name}", f"at most {MAX_CHECKED_ITEMS:,} items")
                continue
            for i, item in enumerate(items):
                yield from _one(item, below, f"{prefix}{name}[{i}]")
        elif message.HasField(name):
            yield from _one(getattr(message, name), below, f"{prefix}{name}")


def _one(value: Any, below: Paths | None, path: str) -> Iterator[FieldViolation]:
    if below is None:  # a Struct, as a Blob of its (merged) bytes
        if value.ByteSize() > MAX_STRUCT_BYTES:
            yield FieldViolation(path, f"larger than {MAX_STRUCT_BYTES:,} bytes encoded")
    else:
        yield from _violations(value, below, path + ".")


@functools.cache
def _shadow_class(descriptor: Descriptor) -> type[Message]:
    """`descriptor`'s message class, only the fields on the way to a Struct, Structs as Blobs."""
    pool = descriptor_pool.DescriptorPool()
    blob = descriptor_pb2.FileDescriptorProto(name=_BLOB_FILE, package=_SHADOW_PACKAGE, syntax="proto3")
    blob.message_type.add(name="Blob")
    pool.Add(blob)
    added: set[str] = set()
    _add_file(pool, descriptor.file.pool, descriptor.file.name, added)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(_shadow_name(descriptor.full_name, descriptor.file.package))
    )


def _shadow_name(full_name: str, package: str) -> str:
    return f"{_SHADOW_PACKAGE}.{full_name}" if package and not package.startswith("google.") else full_name


def _add_file(pool: descriptor_pool.DescriptorPool, source: Any, name: str, added: set[str]) -> None:
    """Add file `name` of `source` to `pool`, dependencies first; our own files shadowed."""
    if name in added:
        return
    added.add(name)
    file = source.FindFileByName(name)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    for dependency in proto.dependency:
        _add_file(pool, source, dependency, added)
    if not proto.package.startswith("google."):
        scope = proto.package
        proto.package = f"{_SHADOW_PACKAGE}.{proto.package}"
        proto.dependency.append(_BLOB_FILE)
        del proto.service[:]  # only messages are decoded here
        for message in proto.message_type:
            _shadow_message(message, source, scope)
    pool.Add(proto)


def _shadow_message(message: descriptor_pb2.DescriptorProto, source: Any, scope: str) -> None:
    full_name = f"{scope}.{message.name}"
    real = source.FindMessageTypeByName(full_name)
    kept = []
    for field in message.field:
        sub = real.fields_by_name[field.name].message_type
        if sub is None:
            continue
        if sub.full_name in _BOUNDED:
            field.type_name = _BLOB
        elif not sub.full_name.startswith("google.protobuf.") and _struct_paths(sub):
            field.type_name = f".{_SHADOW_PACKAGE}{field.type_name}"
        else:
            continue
        # Out of any oneof: a kept field alone in the shadow needs none, and keeping every
        # member's bytes only makes the bound stricter for a request that sends several.
        field.ClearField("oneof_index")
        field.ClearField("proto3_optional")
        field.ClearField("json_name")
        kept.append(field)
    del message.field[:]
    message.field.extend(kept)
    del message.oneof_decl[:]
    for nested in message.nested_type:
        _shadow_message(nested, source, full_name)
