"""Can this exported graph run without running code that came from the file?

A torch.export program is data, but four parts of it reach Python's `eval`/`exec` or the file
system when torch loads or runs it (torch 2.14 sources, checked by tests/test_attacks.py):

- symbolic shape expressions (`expr_str`) go through `sympy.sympify`, which evaluates them;
- `guards_code` strings are compiled with `exec` into the module's input-guard function;
- names are written into the Python source that torch.fx generates and `exec`s for the graph
  (`GraphModule.recompile`) and for its unlifted module (`ExportedProgram.module()`): value names
  become argument and variable names, qualified names of parameters and buffers attribute paths
  (`getattr(self, "...")` where a part is not an identifier), `forward_arg_names` and the
  keyword-argument keys of the input specification the forward's signature;
- a node's `target` names any operator torch can resolve, including `aten::from_file`, which
  creates and maps files.

This module says which of those are plain data: expressions and guards must parse into a small
grammar (numbers, symbols, arithmetic, comparisons, calls of a listed set of sympy/torch
shape functions), names must be identifiers (qualified names: dot-separated word characters and
hyphens), and targets must be tensor operators that touch no files. Everything else is refused
unless the user trusts the file.
"""

from __future__ import annotations

import ast
import functools
import keyword
import math
import operator
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import InputError, shorten


class UnsafeContent(InputError):
    """The file holds something that would run code (or touch files) when loaded or run (exit 2)."""


TRUST_HINT = "If you trust this file, pass --trust-pickle"

# Symbols torch writes into shape expressions: s0, u3, zuf1, ... (torch.utils._sympy.symbol.SymT).
SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]+")
# sympy classes that `srepr` writes for integer shape arithmetic and its relations.
SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
        "Piecewise", "ExprCondPair", "ITE", "Tuple", "true", "false", "oo", "zoo", "nan",
    }
)  # fmt: skip
SYMPY_KEYWORDS = re.compile(r"[a-z_]+")  # assumptions (positive=True) and precision=53
NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")
# Methods a guard may call on an input (L['x'].size()[0] == 8) and module functions it may use.
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
GUARD_MATH = frozenset({"floor", "ceil", "trunc", "isnan", "sqrt", "inf", "nan"})
GUARD_TORCH = frozenset({"sym_max", "sym_min", "sym_int", "sym_float", "sym_not", "sym_ite", "sym_sqrt"})
GUARD_KEY = re.compile(r"[A-Za-z0-9_]*")
# Namespaces whose operators read tensors from outside the program (debug content stores).
DENIED_NAMESPACES = frozenset({"debugprims"})
FILE_ARGUMENT = re.compile(r"file|path")
# Operators that build a tensor over existing memory from given sizes and strides without checking
# that it stays inside the storage (as_strided checks; these do not, torch 2.9-2.14): a crafted
# graph would read or write memory outside a weight.
UNCHECKED_VIEWS = frozenset(
    {
        "_reshape_alias",
        "_reshape_alias_copy",
        "set",
        "set_",
        "_nested_view_from_buffer",
        "_nested_view_from_buffer_copy",
    }
)
# One part of a qualified name (layer1.0.conv1.weight; a ModuleDict key may hold a hyphen).
QUALIFIED_PART = re.compile(r"[\w-]+")

_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.BitAnd, ast.BitOr, ast.BitXor, ast.Invert, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
_STRUCTURE = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, ast.Tuple)


@functools.cache
def _sympy_functions() -> frozenset[str]:
    """sympy names plus torch's own shape functions (the names torch's deserializer passes to sympify)."""
    import torch.utils._sympy.functions as functions

    return SYMPY_NAMES | frozenset(getattr(functions, "__all__", ()))


def _parse(text: str, what: str) -> ast.Expression:
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise UnsafeContent(shorten(f"{what} '{text}' is not a plain expression")) from None


def _refuse(what: str, text: str, detail: str) -> UnsafeContent:
    return UnsafeContent(shorten(f"{what} '{text}' {detail}; torch would evaluate it as Python code. {TRUST_HINT}"))


def check_shape_expression(text: str) -> None:
    """`expr_str` of a symbolic size: sympy's srepr (Mul(Integer(2), Symbol('s0', ...))) or
    infix text (2*s0 + 1), nothing else. torch passes it to sympy.sympify, i.e. to eval."""
    what = "shape expression"
    allowed = _sympy_functions()
    literals: set[int] = set()  # the only strings allowed: Symbol('s0') names and Float('1.5') digits
    for node in ast.walk(_parse(text, what)):
        if isinstance(node, (*_STRUCTURE, *_OPERATORS, ast.keyword)):
            continue
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in allowed:
                raise _refuse(what, text, "calls something other than a sympy shape function")
            for keyword in node.keywords:
                value = keyword.value
                if not (keyword.arg and SYMPY_KEYWORDS.fullmatch(keyword.arg) and isinstance(value, ast.Constant)):
                    raise _refuse(what, text, "passes an unexpected keyword")
                if not isinstance(value.value, (bool, int)):
                    raise _refuse(what, text, "passes an unexpected keyword value")
            pattern = {"Symbol": SYMBOL_NAME, "Float": NUMBER_TEXT}.get(node.func.id)
            first = node.args[0] if node.args else None
            if pattern and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if pattern.fullmatch(first.value):
                    literals.add(id(first))
        elif isinstance(node, ast.Name):
            if not (SYMBOL_NAME.fullmatch(node.id) or node.id in allowed):
                raise _refuse(what, text, f"names '{node.id}'")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in literals:
                raise _refuse(what, text, "holds an unexpected string")
            if not isinstance(node.value, (bool, int, float, str)):
                raise _refuse(what, text, "holds an unexpected constant")
        else:
            raise _refuse(what, text, f"uses {type(node).__name__}")


# Pure builtins torch 2.9 writes into guards (max(1, L['x'].size()[2] // 2) after a pooling).
GUARD_BUILTINS = ("max", "min", "abs")


def _written_into_code(what: str, name: Any, kind: str) -> UnsafeContent:
    # the name is cut short, not the message: the reason and the hint stay whole
    shown = shorten(repr(name), 48)
    return UnsafeContent(f"{what} {shown} is not {kind}; torch writes it into code it runs. {TRUST_HINT}")


def check_value_name(name: Any, what: str) -> None:
    """A name torch.fx writes into generated code as an argument or variable: an identifier."""
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise _written_into_code(what, name, "a Python identifier")


def check_qualified_name(name: Any, what: str) -> None:
    """A parameter's or module's qualified name, which torch.fx writes into generated code as an
    attribute path: parts of word characters and hyphens ('' is the root module)."""
    if not (isinstance(name, str) and (name == "" or all(QUALIFIED_PART.fullmatch(p) for p in name.split(".")))):
        raise _written_into_code(what, name, "a qualified name")


def check_guard(text: str) -> None:
    """A guard on the inputs' shapes (L['x'].size()[0] == 8): torch compiles it with exec."""
    what = "input guard"
    tree = _parse(text, what)
    for node in ast.walk(tree):
        if isinstance(node, (*_STRUCTURE, *_OPERATORS)):
            continue
        if isinstance(node, ast.Name):
            if node.id not in ("L", "math", "torch", "inf", *GUARD_BUILTINS):
                raise _refuse(what, text, f"names '{node.id}'")
        elif isinstance(node, ast.Attribute):
            if not _guard_attribute(node):
                raise _refuse(what, text, f"uses attribute '{node.attr}'")
        elif isinstance(node, ast.Call):
            pure = isinstance(node.func, ast.Name) and node.func.id in GUARD_BUILTINS
            if node.keywords or not (pure or isinstance(node.func, ast.Attribute)):
                raise _refuse(what, text, "calls something other than a shape method")
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if not isinstance(key, ast.Constant) or isinstance(key.value, bool):
                raise _refuse(what, text, "indexes with an expression")
            if isinstance(key.value, str) and not GUARD_KEY.fullmatch(key.value):
                raise _refuse(what, text, "indexes with an unexpected key")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (bool, int, float, str)):
                raise _refuse(what, text, "holds an unexpected constant")
            if isinstance(node.value, str) and not GUARD_KEY.fullmatch(node.value):
                raise _refuse(what, text, "holds an unexpected string")
        else:
            raise _refuse(what, text, f"uses {type(node).__name__}")


def _guard_attribute(node: ast.Attribute) -> bool:
    base = node.value
    if isinstance(base, ast.Name) and base.id in ("math", "torch"):
        return node.attr in (GUARD_MATH if base.id == "math" else GUARD_TORCH)
    return node.attr in GUARD_METHODS and _is_input(base)


def _is_input(node: ast.AST) -> bool:
    """L, L['x'], L['x'][0]: the guard's view of the inputs."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


@functools.cache
def _symbolic_ops() -> frozenset[Any]:
    """Python functions torch.export graphs call on symbolic sizes (the deserializer's own set)."""
    from torch._export.serde import serialize

    return frozenset(getattr(serialize, "_SYM_OPS", ())) | {operator.getitem, math.trunc}


def operator_problem(target: Any) -> str | None:
    """Why a graph may not call `target`, or None when it is a tensor operator that touches no files."""
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace in DENIED_NAMESPACES:
            return f"operator {target} reads data from outside the program"
        if target._schema.name.partition("::")[2] in UNCHECKED_VIEWS:
            return f"operator {target} makes a view from given strides without a bounds check"
        for argument in target._schema.arguments:
            if FILE_ARGUMENT.search(argument.name) and "str" in str(argument.type):
                return f"operator {target} opens files ({argument.name})"
        return None
    if isinstance(target, torch._ops.HigherOrderOperator):
        return None
    try:
        if target in _symbolic_ops():
            return None
    except TypeError:  # unhashable
        pass
    return f"'{getattr(target, '__qualname__', target)}' is not a tensor operator"


@functools.cache
def file_operator_names() -> frozenset[str]:
    """Base names of every registered operator that opens files (from their schemas): from_file, save, ..."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        namespace, _, base = schema.name.partition("::")
        opens = any(FILE_ARGUMENT.search(a.name) and "str" in str(a.type) for a in schema.arguments)
        if opens or namespace in DENIED_NAMESPACES:
            names.add(base)
    return frozenset(names)


@functools.cache
def _deserializer() -> Any:
    from torch._export.serde.serialize import GraphModuleDeserializer

    return GraphModuleDeserializer()


def resolve_target(name: str) -> Any:
    """A serialized node target resolved exactly as torch's deserializer resolves it (attribute by
    attribute from the `torch` module, the name itself where one is missing). Operator names,
    `torch.ops.<namespace>.<op>.<overload>`, are walked here: the deserializer's module imports
    torch._dynamo, a second that a plain archive's load no longer pays (pt2_reader)."""
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        return _deserializer().deserialize_operator(name)
    target: Any = torch
    for part in parts[1:]:
        if not hasattr(target, part):
            return name
        target = getattr(target, part)
    return target


def check_target_name(name: str) -> None:
    """A serialized node target, resolved exactly as torch's deserializer resolves it."""
    if name.startswith("#"):
        raise UnsafeContent(shorten(f"graph calls extension operator '{name}' (custom code). {TRUST_HINT}"))
    problem = operator_problem(resolve_target(name))
    if problem is not None:
        raise UnsafeContent(shorten(f"graph calls '{name}': {problem}. {TRUST_HINT}"))


def graph_modules(program: torch.export.ExportedProgram) -> Iterator[torch.fx.GraphModule]:
    """The program's graph and every subgraph (control flow, wrapped regions)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module


def _callable_leaves(values: Iterable[Any]) -> Iterator[Any]:
    leaves, _ = torch.utils._pytree.tree_flatten(list(values))
    for leaf in leaves:
        if callable(leaf) and not isinstance(leaf, (torch.fx.Node, torch.Tensor, type)):
            yield leaf


def check_program(program: torch.export.ExportedProgram) -> None:
    """After torch.export.load, before anything runs the program: operators, guards, inputs."""
    for module in graph_modules(program):
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            for target in (node.target, *_callable_leaves([node.args, node.kwargs])):
                problem = operator_problem(target)
                if problem is not None:
                    raise UnsafeContent(shorten(f"graph node {node.name}: {problem}. {TRUST_HINT}"))
    for guard in getattr(program, "_guards_code", None) or ():
        check_guard(guard)
    for node in program.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, str) and not GUARD_KEY.fullmatch(value):
            raise UnsafeContent(shorten(f"input {node.name} is the string '{value}', which torch writes into code"))
    _check_example_inputs(program.example_inputs)
    for name, value in (getattr(program, "constants", None) or {}).items():
        if not isinstance(value, torch.Tensor):
            raise UnsafeContent(shorten(f"constant {name} is a {type(value).__name__}, not a tensor. {TRUST_HINT}"))


def _check_example_inputs(example: Any) -> None:
    """Sample inputs name the guard function's arguments: containers with identifier keys only."""
    if example is None:
        return
    stack = [example]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key in value:
                if not (isinstance(key, str) and key.isidentifier()):
                    raise UnsafeContent(shorten(f"sample inputs use the key {key!r}, which torch writes into code"))
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float))):
            raise UnsafeContent(shorten(f"sample inputs hold a {type(value).__name__}, not tensors"))
