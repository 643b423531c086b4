"""Code a newcomer can change: no function in the pack takes more than 8 parameters (settings
travel as objects, not as long argument lists)."""
import ast

from _harness import ROOT

PACKAGES = ("nodes", "loraclr", "cat_training")
MAX_PARAMETERS = 8


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Every parameter, ``*args`` and ``**kwargs`` one each, not counting a method's self or cls."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return count - 1 if names and names[0] in ("self", "cls") else count


def too_many_parameters(source: str, where: str) -> list[str]:
    return [f"{where}:{node.lineno} {node.name} takes {parameter_count(node)} parameters"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > MAX_PARAMETERS]


def test_no_function_takes_more_than_8_parameters():
    found, files = [], 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files += 1
            found += too_many_parameters(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert files > 30  # the walk found the pack
    assert not found, "group these settings into a dataclass:\n" + "\n".join(found)


def test_the_check_counts_what_it_should():
    source = '''
def nine(a, b, c, d, e, f, g, h, i): ...
def eight(a, b, c, d, e, f, g, h): ...
def star(a, b, c, d, e, f, g, *args, **kwargs): ...
class K:
    def method(self, a, b, c, d, e, f, g, h): ...
    @classmethod
    def klass(cls, a, b, c, d, e, f, g, *, h, i=1): ...
    async def later(self, a, b, c, d, e, f, g, h, i): ...
'''
    found = too_many_parameters(source, "x.py")
    assert [f.split()[1] for f in found] == ["nine", "star", "klass", "later"], found
