"""What a statement must say about `customer_id` to run on Citus with the per-customer tables
distributed by it (docs/scaling.md): read with pglast, PostgreSQL's own grammar.

A reference to a per-customer table is *keyed* when the scope that reads it (its SELECT,
UPDATE or DELETE) has a condition `alias.customer_id = X`, `= ANY (X)` or `IN (...)` reachable
from WHERE or its JOIN's ON through AND alone (under OR or NOT it does not prune shards: the
statement reads every shard whenever the other branch holds), or joins it `USING
(customer_id, ...)`; X may be a parameter, another table's column (a co-located join) or an
`unnest` column. An INSERT is keyed when it names the `customer_id` column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, SubLinkType

DISTRIBUTION_COLUMN = "customer_id"


@dataclass(frozen=True)
class UnkeyedReference:
    table: str
    alias: str


def unkeyed_references(sql: str, per_customer_tables: frozenset[str]) -> list[UnkeyedReference]:
    """Every reference to a per-customer table in `sql` that no customer_id condition,
    co-located join or USING clause reaches, in the order they appear."""
    found: list[UnkeyedReference] = []
    for raw in pglast.parse_sql(sql):
        for node in _walk(raw.stmt):
            found.extend(_unkeyed_in_scope(node, per_customer_tables))
    return found


def _walk(node: object) -> Iterator[ast.Node]:
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, ast.Node):
        yield node
        for name in node.__slots__:
            yield from _walk(getattr(node, name, None))


def _unkeyed_in_scope(node: ast.Node, tables: frozenset[str]) -> list[UnkeyedReference]:
    if isinstance(node, ast.InsertStmt):
        columns = {target.name for target in node.cols or ()}
        relation = node.relation
        if relation.relname in tables and DISTRIBUTION_COLUMN not in columns:
            return [UnkeyedReference(relation.relname, _alias(relation))]
        return []
    if isinstance(node, ast.SelectStmt):
        relations, conditions = _from_items(node.fromClause)
        conditions.append(node.whereClause)
    elif isinstance(node, ast.UpdateStmt):
        relations, conditions = _from_items(node.fromClause)
        relations.append(node.relation)
        conditions.append(node.whereClause)
    elif isinstance(node, ast.DeleteStmt):
        relations, conditions = _from_items(node.usingClause)
        relations.append(node.relation)
        conditions.append(node.whereClause)
    else:
        return []
    keyed, keyed_unqualified = _keyed_aliases(conditions)
    return [
        UnkeyedReference(relation.relname, _alias(relation))
        for relation in relations
        if relation.relname in tables and not keyed_unqualified and _alias(relation) not in keyed
    ]


def _alias(relation: ast.RangeVar) -> str:
    return relation.alias.aliasname if relation.alias else relation.relname


def _from_items(items: object) -> tuple[list[ast.RangeVar], list[object]]:
    """The tables a FROM (or USING) list reads directly, and the ON and USING conditions of
    its joins (a USING clause as a list of column names)."""
    relations: list[ast.RangeVar] = []
    conditions: list[object] = []
    pending = list(items or ())
    while pending:
        item = pending.pop()
        if isinstance(item, ast.RangeVar):
            relations.append(item)
        elif isinstance(item, ast.JoinExpr):
            pending += [item.larg, item.rarg]
            if item.usingClause and any(
                name.sval == DISTRIBUTION_COLUMN for name in item.usingClause
            ):
                conditions.append(_UsingCustomer(_joined_aliases(item)))
            conditions.append(item.quals)
    return relations, conditions


@dataclass(frozen=True)
class _UsingCustomer:
    aliases: frozenset[str]


def _joined_aliases(join: ast.JoinExpr) -> frozenset[str]:
    relations, _ = _from_items([join.larg, join.rarg])
    return frozenset(_alias(relation) for relation in relations)


def _keyed_aliases(conditions: list[object]) -> tuple[set[str], bool]:
    """The aliases whose customer_id a conjunctive condition names, and whether an
    unqualified `customer_id` is (it is one table's, or Postgres would refuse it)."""
    keyed: set[str] = set()
    unqualified = False
    pending = list(conditions)
    while pending:
        condition = pending.pop()
        if isinstance(condition, _UsingCustomer):
            keyed |= condition.aliases
            continue
        if isinstance(condition, ast.BoolExpr) and condition.boolop == BoolExprType.AND_EXPR:
            pending += list(condition.args)
            continue
        if isinstance(condition, ast.A_Expr) and condition.kind in (
            A_Expr_Kind.AEXPR_OP,
            A_Expr_Kind.AEXPR_OP_ANY,
            A_Expr_Kind.AEXPR_IN,
        ):
            if condition.name[-1].sval != "=":
                continue
            sides = [condition.lexpr, condition.rexpr]
        elif (
            isinstance(condition, ast.SubLink) and condition.subLinkType == SubLinkType.ANY_SUBLINK
        ):
            sides = [condition.testexpr]
        else:
            continue
        for qualifier in _customer_columns(sides):
            if qualifier == "":
                unqualified = True
            else:
                keyed.add(qualifier)
    return keyed, unqualified


def _customer_columns(sides: list[object]) -> Iterator[str]:
    """The customer_id columns compared for equality: a side, or a member of a row
    `(customer_id, id) IN (...)`, equality of rows being equality of every member."""
    for side in sides:
        members = side.args if isinstance(side, ast.RowExpr) else [side]
        for member in members:
            qualifier = _customer_column(member)
            if qualifier is not None:
                yield qualifier


def _customer_column(expression: object) -> str | None:
    """'' for an unqualified customer_id, the qualifier for `alias.customer_id`, else None."""
    while isinstance(expression, ast.TypeCast):
        expression = expression.arg
    if not isinstance(expression, ast.ColumnRef):
        return None
    names = [field.sval for field in expression.fields if isinstance(field, ast.String)]
    if not names or names[-1] != DISTRIBUTION_COLUMN:
        return None
    return names[-2] if len(names) >= 2 else ""
