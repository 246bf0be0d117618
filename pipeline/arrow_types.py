"""Column types as writers make them, unified to one plain type before a task or sink sees
them.

delta-rs, Polars and pyarrow write view types (``string_view``, ``binary_view``, list views)
and dictionary-encoded strings. pyarrow 26 has no ``take`` kernel for ``string_view`` and will
not concatenate it with ``string``, so every table a worker reads is made plain first: a view
becomes its offset-based type, a dictionary its value type, at any depth. Values are kept.

Types that still differ across the files of one input (``int32`` here, ``int64`` there;
``string`` and ``large_string``) are unified by Arrow's permissive promotion. A passthrough
column whose types cannot be unified (an int in one file, a string in another) is refused at
planning (``check_unifiable``), naming both files and both types; a task's input column of
the wrong type in some file is the task's to judge: its rows are dead-lettered with the type
named, as for any wrongly typed row.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError


def plain_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every view and dictionary type replaced by its plain equivalent."""
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list_view(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_large_list_view(t):
        return pa.large_list(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(plain_type(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(plain_type(t.key_type), plain_type(t.item_type))
    return t


def plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(plain_type(f.type)) for f in schema], schema.metadata)


def _plain_array(array: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_list_view(array.type) or pa.types.is_large_list_view(array.type):
        # Casting a list view to a list gives an invalid array in pyarrow 26: rebuild the
        # offsets from the lengths over the values in logical order.
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        large = pa.types.is_large_list_view(array.type)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if large else np.int32)
        values = array.flatten()
        values = _plain_array(values, plain_type(values.type))
        build = pa.LargeListArray if large else pa.ListArray
        return build.from_arrays(pa.array(offsets), values, type=target, mask=array.is_null())
    return array.cast(target)


def plain_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    target = plain_type(column.type)
    if target == column.type:
        return column
    return pa.chunked_array([_plain_array(chunk, target) for chunk in column.chunks], target)


def plain_table(table: pa.Table) -> pa.Table:
    """``table`` with every column of a view or dictionary type made plain (values kept)."""
    if all(plain_type(f.type) == f.type for f in table.schema):
        return table
    return pa.table([plain_column(c) for c in table.columns], schema=plain_schema(table.schema))


def encode_schema(schema: pa.Schema) -> str:
    """A schema as text for plan.json (Arrow IPC, base64)."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def check_unifiable(schemas: list[tuple[str, pa.Schema]], columns: list[str]) -> None:
    """Refuse (exit 2) a column whose plain types across files cannot be unified: one line
    naming both files and both types. ``schemas``: (file URI, its schema) of the files whose
    schema planning read."""
    # Per column: the type unified so far, and the file that last set it (a null-typed
    # column of an all-null CSV sets nothing, so a later int/string clash is still seen).
    unified: dict[str, tuple[str, pa.DataType]] = {}
    for uri, schema in schemas:
        for name in columns:
            if name not in schema.names:
                continue
            t = plain_type(schema.field(name).type)
            if name not in unified or pa.types.is_null(unified[name][1]):
                unified[name] = (uri, t)
                continue
            other_uri, other = unified[name]
            if other == t or pa.types.is_null(t):
                continue
            try:
                merged = pa.unify_schemas([pa.schema([(name, other)]), pa.schema([(name, t)])],
                                          promote_options="permissive").field(name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise InputError(f"input: column {name!r} is {other} in {other_uri} but {t} in "
                                 f"{uri}; these types cannot be unified") from exc
            unified[name] = (other_uri, merged)
