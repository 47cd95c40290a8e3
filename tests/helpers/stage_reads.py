"""What a stage reads, derived from its source: the penwright modules it imports and the config keys it reads.

* ``code_closure(module)``: the penwright modules ``module`` imports, transitively (any import
  anywhere in a module counts, at module level or inside a function).
* ``config_reads(module, function)``: the config keys ``<module>.<function>(cfg)`` reads, as dotted
  paths (``data.out_dir``; a whole group, ``train``, where the group itself is used: passed to code
  outside penwright, stored, dumped). It follows the config through local names (``g = cfg.generate``),
  ``.get("key")``, and calls into penwright functions, methods and constructors of the stage's modules.
  Static and conservative: whatever it cannot follow counts as read whole.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "penwright"
WHOLE = ("to_dict", "model_dump", "items", "keys", "values", "copy", "model_copy")  # a group used as a whole


def source(module: str) -> Path:
    """``src/penwright/<a>/<b>.py`` for the dotted name ``a.b``, or the directory of a package (``serve``)."""
    path = SRC.joinpath(*module.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path


def _module_of(dotted: str, names: list[str]) -> set[str]:
    """What ``from penwright.<dotted> import <names>`` reads: the modules named, or the module / package itself."""
    found = {f"{dotted}.{n}" if dotted else n for n in names}
    modules = {m for m in found if source(m).with_suffix(".py").is_file()}
    return modules or ({dotted} if dotted else found)


def _trees(module: str) -> list[ast.Module]:
    path = source(module)
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [ast.parse(f.read_text()) for f in files]


def _tree(module: str) -> ast.Module:
    return ast.Module(body=[node for tree in _trees(module) for node in tree.body], type_ignores=[])


def imports(module: str) -> set[str]:
    """The penwright modules (and subpackages) ``module`` imports directly."""
    found = set()
    for node in ast.walk(_tree(module)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "penwright"
        ):
            found |= _module_of(node.module.partition(".")[2], [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("penwright.")}
    return {m for m in found if source(m).exists()}


def code_closure(module: str, skip: Iterable[str] = ()) -> set[str]:
    """``module`` and every penwright module it imports, transitively; not those in ``skip`` (nor what only they import)."""
    todo, seen = [module], set(skip)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += sorted(imports(mod) - seen)
    return seen - set(skip)


class _Function:
    def __init__(self, module: str, node: ast.FunctionDef, owner: str | None):
        self.module, self.node, self.owner = module, node, owner
        args = [a.arg for a in node.args.posonlyargs + node.args.args]
        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
        self.params = args[1:] if owner and not static else args  # self / cls come bound
        self.keywords = self.params + [a.arg for a in node.args.kwonlyargs]

    @property
    def name(self) -> str:
        return ".".join(filter(None, (self.module, self.owner, self.node.name)))


class _Reads:
    def __init__(self, modules: set[str], skip: set[str]):
        self.by_name: dict[str, list[_Function]] = {}
        self.classes: dict[str, list[_Function]] = {}  # class name -> its __init__
        for module in sorted(modules):
            for node in _tree(module).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.by_name.setdefault(node.name, []).append(_Function(module, node, None))
                elif isinstance(node, ast.ClassDef):
                    self.classes.setdefault(node.name, [])
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            fn = _Function(module, item, node.name)
                            self.by_name.setdefault(f"{node.name}.{item.name}", []).append(fn)
                            if item.name == "__init__":
                                self.classes[node.name].append(fn)
        self.skip = skip
        self.found: set[tuple[str, ...]] = set()
        self.done: set[tuple[str, tuple]] = set()

    # -- following calls ----------------------------------------------------------------------------

    def _callees(self, call: ast.Call, owner: str | None) -> list[_Function] | None:
        f = call.func
        if isinstance(f, ast.Name):
            if f.id in self.classes:
                return self.classes[f.id]
            return [fn for fn in self.by_name.get(f.id, []) if fn.owner is None] or None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            cls = owner if f.value.id in ("self", "cls") else f.value.id
            return self.by_name.get(f"{cls}.{f.attr}") or None
        return None

    def scan(self, fn: _Function, bound: dict[str, tuple[str, ...]]) -> None:
        key = (fn.name, tuple(sorted(bound.items())))
        if fn.node.name in self.skip or fn.name in self.skip or key in self.done:
            return
        self.done.add(key)
        env = dict(bound)
        body = ast.Module(body=fn.node.body, type_ignores=[])
        changed = True
        while changed:  # local names for parts of the config: g = cfg.generate; tok = g.tokenizer
            changed = False
            for node in ast.walk(body):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    path = self._path(node.value, env)
                    if path is not None and env.get(node.targets[0].id) != path:
                        env[node.targets[0].id] = path
                        changed = True
        for stmt in fn.node.body:
            self._visit(stmt, env, fn.owner)

    def _path(self, node: ast.AST, env: dict) -> tuple[str, ...] | None:
        """The config path ``node`` evaluates to, or None when it is not a part of the config."""
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute) and node.attr not in WHOLE + ("get",):
            base = self._path(node.value, env)
            return None if base is None else base + (node.attr,)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            base = self._path(node.func.value, env)
            return None if base is None else base + (node.args[0].value,)
        return None

    def _visit(self, node: ast.AST, env: dict, owner: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            for child in ast.iter_child_nodes(node):  # a nested function: its own names shadow nothing we track
                self._visit(child, env, owner)
            return
        path = self._path(node, env)
        if path is not None:
            self.found.add(path)
            return
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and self._path(node.value, env) is not None
        ):
            return  # an alias: its uses are what counts
        if isinstance(node, ast.Call):
            callees = self._callees(node, owner)
            passed = [(i, a) for i, a in enumerate(node.args) if self._path(a, env) is not None]
            named = [(k.arg, k.value) for k in node.keywords if k.arg and self._path(k.value, env) is not None]
            if callees and (passed or named):
                for fn in callees:
                    bound = {}
                    for i, arg in passed:
                        if i < len(fn.params):
                            bound[fn.params[i]] = self._path(arg, env)
                        else:
                            self.found.add(self._path(arg, env))
                    for name, arg in named:
                        if name in fn.keywords:
                            bound[name] = self._path(arg, env)
                        else:
                            self.found.add(self._path(arg, env))
                    self.scan(fn, bound)
                handled = {id(a) for _, a in passed} | {id(a) for _, a in named}
                for child in ast.iter_child_nodes(node):
                    if id(child) not in handled:
                        if isinstance(child, ast.keyword):
                            if id(child.value) not in handled:
                                self._visit(child.value, env, owner)
                        else:
                            self._visit(child, env, owner)
                return
        for child in ast.iter_child_nodes(node):
            self._visit(child, env, owner)


def config_reads(module: str, function: str, skip: set[str] = frozenset()) -> set[str]:
    """The config keys ``<module>.<function>(cfg)`` reads (dotted), not following into the functions in
    ``skip`` (by name, ``build_loggers``, or with their module, ``loggers.build_loggers``). The empty
    string: the whole config."""
    reads = _Reads(code_closure(module), set(skip))
    (entry,) = [fn for fn in reads.by_name[function] if fn.module == module and fn.owner is None]
    reads.scan(entry, {entry.params[0]: ()})
    return {".".join(p) for p in reads.found}
