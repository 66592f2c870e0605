"""BFCL's OWN checker and decoder, loaded from the pinned bfcl-eval wheel, for reference tests.

    from tests.bfcl_ref import bfcl_ast_check, bfcl_decode_python, bfcl_verdict
    bfcl_ast_check(functions, decoded_calls, possible_answer, "parallel")  # {"valid", "error", "error_type"}
    bfcl_decode_python("[f(a=1)]")          # BFCL's default_decode_ast_prompting (raises like BFCL does)
    bfcl_verdict(text, functions, possible_answer, category)  # the full BFCL pipeline for one model output
    bfcl_system_prompt(functions)           # BFCL's default system prompt, with its Python-3 hint added

Importing `bfcl_eval.eval_checker.ast_eval.ast_checker` normally pulls every API client through
`bfcl_eval.constants.model_config`; a stub module registered under that name first (its
MODEL_CONFIG_MAPPING maps any model to an object with underscore_to_dot=False) avoids that, after which the
checker needs only the standard library. The decoder lives in bfcl_eval/model_handler/utils.py, which imports
tree-sitter, tenacity and more; we compile just its pure decoding functions (`ast_parse`, `resolve_ast_call`,
`resolve_ast_by_type`, `default_decode_ast_prompting`) from the wheel's own source text.

BFCL's decoder evals arithmetic (`ast.BinOp`) and lambdas: only give it test inputs, never model output.
"""
from __future__ import annotations

import ast
import os
import sys
import tempfile
import types
from functools import lru_cache

from fctrain.data import bfcl_root

MODEL_NAME = "fctrain-reference"


class _AnyModelConfig(dict):
    def __missing__(self, key):
        return types.SimpleNamespace(underscore_to_dot=False, is_fc_model=False)


@lru_cache(maxsize=None)
def _bfcl():
    root = bfcl_root()
    os.environ.setdefault("BFCL_PROJECT_ROOT", tempfile.mkdtemp(prefix="bfcl_project_"))
    site = str(root.parent)
    if site not in sys.path:
        sys.path.insert(0, site)
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = _AnyModelConfig()
    sys.modules.setdefault("bfcl_eval.constants.model_config", stub)
    from bfcl_eval.constants.enums import Language, ReturnFormat
    from bfcl_eval.eval_checker.ast_eval import ast_checker as checker_module

    # The decoder functions, compiled from the wheel's source (see the module docstring).
    utils_src = (root / "model_handler" / "utils.py").read_text()
    tree = ast.parse(utils_src)
    wanted = {"ast_parse", "resolve_ast_call", "resolve_ast_by_type", "default_decode_ast_prompting"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted, "bfcl-eval's decoder functions moved"
    namespace = {"ast": ast, "re": __import__("re"), "builtins": __import__("builtins"),
                 "ReturnFormat": ReturnFormat, "__builtins__": __builtins__}
    namespace["parse_java_function_call"] = namespace["parse_javascript_function_call"] = None
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(root / "model_handler" / "utils.py"), "exec"),
         namespace)

    utils_module = types.SimpleNamespace()
    bfcl_utils_src = (root / "utils.py").read_text()
    utree = ast.parse(bfcl_utils_src)
    ufuncs = [n for n in utree.body if isinstance(n, ast.FunctionDef)
              and n.name in ("is_function_calling_format_output", "is_empty_output")]
    uns: dict = {}
    exec(compile(ast.Module(body=ufuncs, type_ignores=[]), str(root / "utils.py"), "exec"), uns)
    utils_module.is_function_calling_format_output = uns["is_function_calling_format_output"]
    utils_module.is_empty_output = uns["is_empty_output"]
    return checker_module, Language, namespace["default_decode_ast_prompting"], utils_module


def bfcl_ast_check(functions: list[dict], decoded_calls: list[dict], possible_answer: list[dict],
                   category: str) -> dict:
    """BFCL's ast_checker (Python) on already-decoded calls."""
    checker_module, language, _, _ = _bfcl()
    return checker_module.ast_checker(functions, decoded_calls, possible_answer, language.PYTHON, category,
                                      MODEL_NAME)


def bfcl_decode_python(text: str) -> list[dict]:
    """BFCL's default_decode_ast_prompting for Python output; raises on what BFCL cannot decode."""
    _, _, decode, _ = _bfcl()
    return decode(text)


def bfcl_verdict(text: str, functions: list[dict], possible_answer: list[dict], category: str) -> bool:
    """BFCL's whole evaluation of one raw model output (eval_runner's relevance / AST paths)."""
    _, _, decode, utils = _bfcl()
    if "relevance" in category:  # both irrelevance and relevance
        try:
            decoded = decode(text)
            contains_call = not utils.is_empty_output(decoded)
        except Exception:
            contains_call = False
        return not contains_call if "irrelevance" in category else contains_call
    try:
        decoded = decode(text)
    except Exception:
        return False
    if not utils.is_function_calling_format_output(decoded):
        return False
    return bfcl_ast_check(functions, decoded, possible_answer, category)["valid"]


@lru_cache(maxsize=None)
def _prompt_functions():
    root = bfcl_root()
    _bfcl()  # puts the wheel on sys.path
    import copy
    import json
    import re
    from typing import Optional

    from bfcl_eval.constants import default_prompts

    ns = {k: getattr(default_prompts, k) for k in dir(default_prompts) if not k.startswith("__")}
    ns.update(json=json, re=re, Optional=Optional, copy=copy, __builtins__=__builtins__,
              is_java=lambda category: False, is_js=lambda category: False)
    for path, names in ((root / "model_handler" / "utils.py",
                         {"formulate_system_prompt", "format_function_doc", "parse_prompt_variation_params"}),
                        (root / "utils.py", {"_get_language_specific_hint", "_func_doc_language_specific_pre_processing"})):
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        assert {f.name for f in funcs} == names, f"bfcl-eval's prompt functions moved in {path}"
        exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec"), ns)
    return ns


def bfcl_system_prompt(functions: list[dict], category: str = "simple_python") -> str:
    """BFCL's default system prompt for a prompting model, built by BFCL's own functions."""
    import copy

    ns = _prompt_functions()
    hinted = ns["_func_doc_language_specific_pre_processing"](copy.deepcopy(functions), category)
    return ns["formulate_system_prompt"](ns["DEFAULT_SYSTEM_PROMPT_FORMAT"], hinted)
