"""Every check the tool can print (`phases.check("name", ...)` in param_swap/) has a row in docs/phases.md's
table of planted defects, naming tests that exist and assert its failure (assert_checks_failed). conftest.py
counts, at the end of each session, the checks those tests saw fail: a check added without such a test fails
here, and a listed test that stops seeing its check fail fails the session."""

import ast
import glob
import os
import re

from conftest import MUTATED, ROOT, planted_table


def tool_checks() -> set[str]:
    """The names of every check the tool can print: the string constants passed to a `.check(...)` call."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "param_swap", "*.py")):
        found |= {node.args[0].value for node in ast.walk(ast.parse(open(path).read()))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}
    return found


def test_tool_checks_are_found():
    checks = tool_checks()
    assert {"leaves_unchanged", "generate", "rounds_no_leak", "serve_no_lost_requests"} <= checks
    assert all(re.fullmatch(r"[a-z_]+", c) for c in checks), checks


def test_every_check_has_a_planted_defect_and_a_test_that_sees_it_fail():
    table = planted_table()
    assert set(table) == tool_checks(), ("docs/phases.md's planted-defect table against the tool's checks",
                                         sorted(set(table) ^ tool_checks()))
    for check, tests in table.items():
        assert tests, f"{check}: no test listed"
        for test in tests:
            path, name = test.split("::")
            source = open(os.path.join(ROOT, "tests", path)).read()
            functions = {f.name: ast.get_source_segment(source, f) for f in ast.walk(ast.parse(source))
                         if isinstance(f, ast.FunctionDef)}
            assert name in functions, f"{check}: {test} does not exist"
            assert "assert_checks_failed(" in functions[name], f"{check}: {test} never asserts a failed check"
    documented = open(MUTATED).read().split('"""')[1]  # mutated_run.py's usage: one line per mutation
    for check, names in planted_table(column="defects").items():
        assert names, f"{check}: no planted defect named"
        for n in names:
            assert re.search(rf"^  {n} ", documented, re.M), f"{check}: planted defect {n} is not in tests/mutated_run.py"

