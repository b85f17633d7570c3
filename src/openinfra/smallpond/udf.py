"""Typed Python UDFs for SQL nodes: smallpond's ``@udf`` decorator and its ``UDF*Type`` classes.

A UDF made with ``@udf(params=[...], return_type=...)`` carries its DuckDB signature, so a SQL node
given ``udfs=[gcd]`` registers it under its name in each task's DuckDB connection::

    @udf(params=[UDFType.BIGINT, UDFType.BIGINT], return_type=UDFType.BIGINT)
    def gcd(a: int, b: int) -> int:
        while b:
            a, b = b, a % b
        return a

    SqlEngineNode(ctx, (src,), "select gcd(a, b) as g from {0}", udfs=[gcd])

The types are resolved to DuckDB types only inside the task (``to_duckdb_type``), so the classes do
not depend on the DuckDB version (smallpond imported ``duckdb.typing``, which DuckDB 2 removed).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "UDFType", "UDFStructType", "UDFListType", "UDFMapType", "UDFAnyParameters", "UserDefinedFunction", "udf",
    "to_duckdb_params",
]

_NAME_RE = re.compile(r"^[a-zA-Z0-9_]+$")


class UDFType(enum.Enum):
    """A DuckDB scalar type, by the name DuckDB gives it (``UDFType.BIGINT`` -> ``BIGINT``)."""

    SQLNULL = 1
    BOOLEAN = 2
    TINYINT = 3
    UTINYINT = 4
    SMALLINT = 5
    USMALLINT = 6
    INTEGER = 7
    UINTEGER = 8
    BIGINT = 9
    UBIGINT = 10
    HUGEINT = 11
    UUID = 12
    FLOAT = 13
    DOUBLE = 14
    DATE = 15
    TIMESTAMP = 16
    TIMESTAMP_MS = 17
    TIMESTAMP_NS = 18
    TIMESTAMP_S = 19
    TIME = 20
    TIME_TZ = 21
    TIMESTAMP_TZ = 22
    VARCHAR = 23
    BLOB = 24
    BIT = 25
    INTERVAL = 26

    @property
    def sql_name(self) -> str:
        """The type's name in DuckDB SQL (``NULL`` for ``SQLNULL``)."""
        return {"SQLNULL": "NULL", "TIME_TZ": "TIME WITH TIME ZONE",
                "TIMESTAMP_TZ": "TIMESTAMP WITH TIME ZONE"}.get(self.name, self.name)

    def to_duckdb_type(self) -> Any:
        """The ``duckdb`` type object (imported here, in the task's process)."""
        import duckdb

        return duckdb.sqltype(self.sql_name)

    def __repr__(self) -> str:
        return f"UDFType.{self.name}"


def _check_type(value: Any, what: str) -> None:
    if not isinstance(value, (UDFType, UDFStructType, UDFListType, UDFMapType)):
        raise TypeError(f"{what} must be a UDFType, UDFListType, UDFMapType or UDFStructType, got {value!r}")


class UDFStructType:
    """A STRUCT type: ``UDFStructType({"host": "VARCHAR", "port": "INTEGER"})`` (field -> DuckDB type name)."""

    def __init__(self, fields: dict[str, str] | list[str]) -> None:
        if not isinstance(fields, (dict, list)) or not fields:
            raise TypeError(f"fields must be a non-empty dict of name -> type (or a list of types), got {fields!r}")
        self.fields = fields

    def to_duckdb_type(self) -> Any:
        import duckdb

        fields = self.fields
        if isinstance(fields, dict):
            fields = {k: (v.to_duckdb_type() if hasattr(v, "to_duckdb_type") else duckdb.sqltype(v)) for k, v in fields.items()}
        else:
            fields = [v.to_duckdb_type() if hasattr(v, "to_duckdb_type") else duckdb.sqltype(v) for v in fields]
        return duckdb.struct_type(fields)

    def __repr__(self) -> str:
        return f"UDFStructType({self.fields!r})"


class UDFListType:
    """A LIST type: ``UDFListType(UDFType.INTEGER)``."""

    def __init__(self, child: Any) -> None:
        _check_type(child, "child")
        self.child = child

    def to_duckdb_type(self) -> Any:
        import duckdb

        return duckdb.list_type(self.child.to_duckdb_type())

    def __repr__(self) -> str:
        return f"UDFListType({self.child!r})"


class UDFMapType:
    """A MAP type: ``UDFMapType(UDFType.VARCHAR, UDFType.INTEGER)``."""

    def __init__(self, key: Any, value: Any) -> None:
        _check_type(key, "key")
        _check_type(value, "value")
        self.key = key
        self.value = value

    def to_duckdb_type(self) -> Any:
        import duckdb

        return duckdb.map_type(self.key.to_duckdb_type(), self.value.to_duckdb_type())

    def __repr__(self) -> str:
        return f"UDFMapType({self.key!r}, {self.value!r})"


class UDFAnyParameters:
    """``params=UDFAnyParameters()``: the function takes any arguments (DuckDB infers none)."""

    def to_duckdb_type(self) -> None:
        return None

    def __repr__(self) -> str:
        return "UDFAnyParameters()"


def to_duckdb_params(params: Any) -> Any:
    """DuckDB's ``parameters`` argument of ``create_function`` from ours (lists of UDF types pass through
    converted; plain DuckDB types or ``None`` pass through unchanged)."""
    if params is None or isinstance(params, UDFAnyParameters):
        return None
    return [p.to_duckdb_type() if hasattr(p, "to_duckdb_type") else p for p in params]


@dataclass
class UserDefinedFunction:
    """A Python function with its DuckDB signature; calling it calls the function."""

    name: str
    func: Callable
    params: list[Any] | UDFAnyParameters
    return_type: Any
    use_arrow_type: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"udf name must match [a-zA-Z0-9_]+, got {self.name!r}")
        if not callable(self.func):
            raise TypeError(f"udf {self.name!r}: func must be callable, got {type(self.func).__name__}")
        if not isinstance(self.params, UDFAnyParameters):
            if not isinstance(self.params, (list, tuple)):
                raise TypeError(f"udf {self.name!r}: params must be a list of UDF types or UDFAnyParameters(), got {self.params!r}")
            for i, p in enumerate(self.params):
                _check_type(p, f"udf {self.name!r}: params[{i}]")
            self.params = list(self.params)
        _check_type(self.return_type, f"udf {self.name!r}: return_type")

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)


def udf(params: list[Any] | UDFAnyParameters, return_type: Any, use_arrow_type: bool = False,
        name: str | None = None) -> Callable[[Callable], UserDefinedFunction]:
    """Decorator making a Python function a typed SQL UDF (named ``name`` or the function's name).

    ``use_arrow_type=True`` calls the function once per vector with pyarrow arrays instead of once
    per row with Python values (much faster for vectorizable code).
    """

    def wrap(func: Callable) -> UserDefinedFunction:
        return UserDefinedFunction(name or getattr(func, "__name__", ""), func, params, return_type, use_arrow_type)

    return wrap
