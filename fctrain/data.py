"""Examples and their loaders: BFCL v4 from its wheel, xLAM-60k, our JSONL, the committed splits.

    examples = load_bfcl(["simple_python", "multiple"])           # read from the bfcl-eval wheel, offline
    examples = load_any("split:train+bfcl:live_simple")            # any source spec the trainer takes
    train, evals = split(examples, eval_fraction=0.1, seed=0)

The Example itself is in fctrain.example; what the model sees and should answer (prompts, SFT targets) in
fctrain.prompts; the two-stage data cleaning (rule validation, LLM judge) and its command line,
`python -m fctrain.cleaning validate|judge ...`, in fctrain.cleaning. `TrainData` is the trainer's sampler.

No torch or transformers import.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m fctrain.data ...`: the old spelling of `python -m fctrain.cleaning ...`, kept
    import runpy            # for one release. It runs before this module defines anything: fctrain.data loads once.
    runpy.run_module("fctrain.cleaning", run_name="__main__", alter_sys=True)

import copy
import functools
import json
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fctrain import reward
from fctrain.assets import cache_dir, extract_from_wheel, fetch_wheel
from fctrain.example import Example

BFCL_WHEEL = "bfcl-eval==2026.3.23"
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
                   "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                   "live_irrelevance", "live_relevance")


# ---------------------------------------------------------------------------------------------------------
# loaders

def bfcl_root() -> Path:
    """The extracted `bfcl_eval/` package of the pinned wheel (data/ and eval_checker/), fetched once."""
    wheel = fetch_wheel(BFCL_WHEEL)
    dest = cache_dir("bfcl")
    return extract_from_wheel(wheel, "bfcl_eval/", dest)  # the marker is per prefix: data/ alone won't hide it


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
    return rows


def load_bfcl(categories: Iterable[str] | str, limit: int | None = None) -> list[Example]:
    """BFCL v4 single-turn examples of `categories` (names or a comma-separated string), `limit` per category.

    Tools are the raw BFCL schemas (the "Python 3 syntax" hint BFCL appends is added by build_messages for
    fmt="bfcl"). Irrelevance and relevance categories have no possible answers: ground_truth = [].
    """
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    data = bfcl_root() / "data"
    out = []
    for cat in categories:
        if cat not in BFCL_CATEGORIES:
            raise ValueError(f"unknown BFCL category {cat!r}; single-turn categories are {BFCL_CATEGORIES}")
        entries = _read_json_lines(data / f"BFCL_v4_{cat}.json")
        answer_file = data / "possible_answer" / f"BFCL_v4_{cat}.json"
        answers = {a["id"]: a["ground_truth"] for a in _read_json_lines(answer_file)} if answer_file.exists() else {}
        if limit is not None:
            entries = entries[:limit]
        for e in entries:
            if len(e["question"]) != 1:
                raise ValueError(f"{e['id']}: {len(e['question'])} turns; only single-turn categories are supported")
            if answers and e["id"] not in answers:
                raise ValueError(f"{e['id']}: no possible answer in {answer_file}")
            messages = [{"role": m["role"], "content": m["content"]} for m in e["question"][0]]
            out.append(Example(e["id"], cat, messages, e["function"], answers.get(e["id"], [])))
    return out


_XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "float",
               "number": "float", "bool": "boolean", "boolean": "boolean", "list": "array", "array": "array",
               "dict": "dict", "object": "dict", "tuple": "tuple", "set": "array", "any": "any"}


def _xlam_param(spec: dict) -> tuple[dict, bool]:
    """xLAM parameter {"type": "List[int], optional", "description", "default"} -> (BFCL schema, optional)."""
    raw = str(spec.get("type", "any")).strip()
    optional = raw.endswith(", optional") or "default" in spec
    raw = raw.removesuffix(", optional").strip()
    if "," in raw and "[" not in raw:  # "int, default=5"
        head, tail = raw.split(",", 1)
        optional = optional or "default" in tail or "optional" in tail
        raw = head.strip()
    m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", raw)
    if m and m.group(1).lower() == "optional" and m.group(2):  # Optional[X] = X, may be omitted
        optional, raw = True, m.group(2).strip()
        m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", raw)
    outer = m.group(1).lower() if m else "any"
    out = {"type": _XLAM_TYPES.get(outer, "any"), "description": spec.get("description", "")}
    if out["type"] in ("array", "tuple"):
        inner = (m.group(2) or "any").split(",")[0].strip() if m else "any"
        inner = re.fullmatch(r"(\w+)", inner.split("[")[0])
        out["items"] = {"type": _XLAM_TYPES.get(inner.group(1).lower(), "any") if inner else "any"}
    if "default" in spec:
        out["default"] = spec["default"]
    return out, optional


def xlam_to_example(row: dict, index: int) -> Example:
    """One xLAM-function-calling-60k row (query, tools and answers as JSON strings) as an Example."""
    tools_raw = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
    answers = json.loads(row["answers"]) if isinstance(row["answers"], str) else row["answers"]
    tools = []
    for t in tools_raw:
        props, required = {}, []
        for name, spec in (t.get("parameters") or {}).items():
            props[name], optional = _xlam_param(spec if isinstance(spec, dict) else {})
            if not optional:
                required.append(name)
        tools.append({"name": t["name"], "description": t.get("description", ""),
                      "parameters": {"type": "dict", "properties": props, "required": required}})
    by_name = {t["name"]: t for t in tools}
    truth = []
    for a in answers:
        args = a.get("arguments") or {}
        allowed = {p: [v] for p, v in args.items()}
        schema = by_name.get(a["name"], {"parameters": {"properties": {}}})["parameters"]["properties"]
        for p, spec in schema.items():
            if p not in allowed and p not in by_name[a["name"]]["parameters"]["required"]:
                allowed[p] = [""]
                default = spec.get("default")
                if default not in (None, "") and reward.check_param(p, default, spec, [default])[0]:
                    allowed[p].append(default)
        truth.append({a["name"]: allowed})
    names = {next(iter(c)) for c in truth}
    if not truth:
        category = "irrelevance"
    elif len(truth) == 1:
        category = "simple" if len(tools) == 1 else "multiple"
    else:
        category = "parallel" if len(names) == 1 and len(tools) == 1 else "parallel_multiple"
    return Example(f"xlam_{row.get('id', index)}", category, [{"role": "user", "content": row["query"]}],
                   tools, truth)


def _load_rows(path: Path, convert, on_error: str, skipped: Counter | None, max_bad: float = 1.0) -> list[Example]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array file (how the xLAM dataset ships)
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON array: {e}") from None
        where = "row"
    else:
        rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = "line"
    out, bad = [], []  # bad: (row or line number, reason)
    for n, row in rows:
        try:
            obj = json.loads(row) if isinstance(row, str) else row
            out.append(convert(obj, n))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            reason = f"{type(e).__name__}: {str(e)[:120]}"
            if on_error == "raise":
                raise ValueError(f"{path}: {where} {n}: {reason}") from None
            bad.append((n, reason.split(":")[0] if isinstance(e, json.JSONDecodeError) else reason))
    if len(bad) > max_bad * len(rows):
        raise ValueError(f"{path}: {len(bad)} of {len(rows)} {where}s malformed, more than {max_bad:.1%}: "
                         + "; ".join(f"{where} {n}: {reason}" for n, reason in bad[:5])
                         + ("; ..." if len(bad) > 5 else ""))
    if bad:
        reasons = Counter(reason for _, reason in bad)
        numbers = ", ".join(str(n) for n, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
        print(f"[fctrain.data] {path}: skipped {len(bad)} of {len(rows)} malformed {where}s ({where}s {numbers}): "
              f"{dict(reasons)}", file=sys.stderr)
        if skipped is not None:
            skipped.update(reasons)
    return out


def load_xlam(path, on_error: str = "raise", skipped: Counter | None = None, max_bad: float = 1.0) -> list[Example]:
    """xLAM-function-calling-60k (JSON array or JSONL of {id, query, tools, answers}) as Examples.

    Broken rows raise ValueError naming the row, or with on_error="skip" are skipped and counted by reason
    (printed with their row numbers, and added to `skipped` when given); more than `max_bad` (a fraction of
    the file's rows) broken raises ValueError naming the first ones.
    """
    return _load_rows(path, lambda obj, n: xlam_to_example(obj, n), on_error, skipped, max_bad)


def load_jsonl(path, on_error: str = "raise", skipped: Counter | None = None, max_bad: float = 1.0) -> list[Example]:
    """Our own JSONL (one Example.to_json() per line). Broken lines: see load_xlam."""
    return _load_rows(path, lambda obj, n: Example.from_dict(obj), on_error, skipped, max_bad)


def save_jsonl(examples: Iterable[Example], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
    tmp.replace(path)


SYNTHETIC_IRRELEVANCE = "synthetic_irrelevance"


def swapped_tools_negative(question: Example, tools_from: Example) -> Example:
    """A negative example: `question`'s turns offered `tools_from`'s tools only, so the right answer is no
    call (BFCL's `irrelevance` category is built the same way: a question beside a function that cannot
    answer it). Refused when the two share a function name. Its id "neg:<question id>|<tools id>" is what a
    split manifest stores."""
    if {t["name"] for t in question.tools} & {t["name"] for t in tools_from.tools}:
        raise ValueError(f"{question.id} and {tools_from.id} share a function; not a negative")
    return Example(f"neg:{question.id}|{tools_from.id}", SYNTHETIC_IRRELEVANCE, [dict(m) for m in question.messages],
                   copy.deepcopy(tools_from.tools), [])


# Words that say nothing about a function's topic: left out when near_miss_candidates compares texts.
_FILLER = frozenset("""a an and are as at be by can do does for from get given how i in into is it its me my of on or
    set that the this to what which with you your calculate compute find fetch retrieve return returns specified
    specific based using use who whom whose where when why will would should could please about also has have
    had was were not no if than then there some any all""".split())


def _topic_words(text: str) -> set[str]:
    """Lower-case words of `text`, camelCase and snake_case split, filler words left out."""
    words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", text) if len(w) > 1} - _FILLER
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words}  # prices, price: one word


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def near_miss_candidates(question: Example, pool: list[Example], max_name_overlap: float = 0.2,
                         max_description_overlap: float = 0.3) -> list[Example]:
    """The examples of `pool` whose tools could make a *near-miss* negative for `question`
    (swapped_tools_negative(question, candidate)), nearest topic first: BFCL's `irrelevance` category offers a
    function on the question's topic that cannot answer it ("Who won the last world cup?" beside
    get_match_stats), where a random swap offers one from another field that a model rejects easily.
    Topic = the words of the question's turns against those of the candidate's function names and descriptions
    (cosine of the word sets; ties in a fixed order of their own per question). A candidate is left out when it
    shares a function name with the question, or when one of its functions looks like a renamed copy of one of
    the question's own: more than `max_name_overlap` of the name words or `max_description_overlap` of the
    description words in common (Jaccard). A rule, not a judge: a nearby function may still answer a question,
    so the negatives it makes are read before use."""
    asked = _topic_words(" ".join(str(m.get("content", "")) for m in question.messages))
    own = [(_topic_words(t["name"]), _topic_words(str(t.get("description", "")))) for t in question.tools]
    names = {t["name"] for t in question.tools}
    scored = []
    for i, cand in enumerate(pool):
        if names & {t["name"] for t in cand.tools}:
            continue
        theirs = [(_topic_words(t["name"]), _topic_words(str(t.get("description", "")))) for t in cand.tools]
        if any(_jaccard(n, m) > max_name_overlap or _jaccard(d, e) > max_description_overlap
               for n, d in own for m, e in theirs):
            continue
        offered = set().union(*(n | d for n, d in theirs)) if theirs else set()
        score = len(asked & offered) / ((len(asked) * len(offered)) ** 0.5) if asked and offered else 0.0
        scored.append((-score, zlib.crc32(f"{question.id}|{cand.id}".encode()), i, cand))
    return [cand for *_, cand in sorted(scored, key=lambda x: x[:3])]  # ties: a fixed per-question order


def negative_sources(example_id: str) -> tuple[str, str] | None:
    """(question id, tools id) of a swapped-tool negative's id ("neg:<question id>|<tools id>"), else None."""
    if not example_id.startswith("neg:"):
        return None
    question, _, tools = example_id[len("neg:"):].partition("|")
    return question, tools


SPLITS_DIR = Path(__file__).resolve().parent / "splits"
DEFAULT_SPLITS = "bfcl_v4_seed16"  # written by benchmarks/bench_rl.py (its build_sets), checked by its test


def load_split(spec: str) -> list[Example]:
    """`<set>` or `<manifest>:<set>`: the BFCL examples listed under "sets"/<set> in
    fctrain/splits/<manifest>.json (default DEFAULT_SPLITS), in the listed order. A manifest holds ids only:
    fixed train / validation / held-out sets that every run and benchmark can name."""
    manifest, _, name = spec.rpartition(":")
    path = SPLITS_DIR / f"{manifest or DEFAULT_SPLITS}.json"
    if not path.exists():
        raise ValueError(f"split manifest {path} not found; known: {sorted(p.stem for p in SPLITS_DIR.glob('*.json'))}")
    info = json.loads(path.read_text())
    if name not in info["sets"]:
        raise ValueError(f"{path.name} has no set {name!r}; its sets: {sorted(info['sets'])}")
    ids = info["sets"][name]
    by_id = {e.id: e for e in load_bfcl(info["categories"])}
    sources = [part for i in ids for part in (negative_sources(i) or (i,))]
    missing = [i for i in sources if i not in by_id]
    if missing:
        raise ValueError(f"{path.name}:{name}: {len(missing)} ids not in BFCL {BFCL_WHEEL}, e.g. {missing[:3]}")
    return [swapped_tools_negative(*(by_id[x] for x in pair)) if (pair := negative_sources(i)) else by_id[i]
            for i in ids]


def load_any(spec: str, on_error: str = "raise", skipped: Counter | None = None,
             max_bad: float = 1.0) -> list[Example]:
    """`bfcl:<cat,...>`, `split:[<manifest>:]<set>` (load_split), an xLAM file (its name contains "xlam"),
    our JSONL, or several of these joined by `+` (concatenated in order). `on_error`, `skipped` and
    `max_bad` apply to the files (see load_xlam)."""
    if "+" in spec:
        return [e for part in spec.split("+") for e in load_any(part.strip(), on_error, skipped, max_bad)]
    if spec.startswith("split:"):
        return load_split(spec[len("split:"):])
    if spec.startswith("bfcl:"):
        return load_bfcl(spec[len("bfcl:"):])
    if "xlam" in Path(spec).name.lower():
        return load_xlam(spec, on_error=on_error, skipped=skipped, max_bad=max_bad)
    return load_jsonl(spec, on_error=on_error, skipped=skipped, max_bad=max_bad)


def shuffle(examples: list[Example], seed: int) -> list[Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) after a seeded shuffle; eval gets round(eval_fraction * n) examples."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    shuffled = shuffle(examples, seed)
    n_eval = round(eval_fraction * len(shuffled))
    return shuffled[n_eval:], shuffled[:n_eval]


# ---------------------------------------------------------------------------------------------------------
# the training sampler

@dataclass
class TrainData:
    """The trainer's sampler: the training prompts, drawn in a seeded per-epoch order (its `position` is saved
    in every checkpoint, so a resume draws what the run would have drawn), and the held-out evaluation sets."""
    examples: list                  # Example, each within max_prompt_tokens
    prompt_ids: dict                # example id -> prompt token ids
    eval_sets: dict                 # each "+"-part of eval_data -> its examples (reported on its own)
    seed: int
    position: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})  # saved in every checkpoint

    @property
    def eval_examples(self) -> list:
        return [e for exs in self.eval_sets.values() for e in exs]

    @functools.cached_property
    def pairs(self) -> list[tuple]:
        """(swapped-tool negative "neg:Q|T", Q): each negative whose question Q is itself a training example."""
        by_id = {e.id: e for e in self.examples}
        return [(e, by_id[src[0]]) for e in self.examples if (src := negative_sources(e.id)) and src[0] in by_id]

    def check_pairs(self):
        """A clear error before any training when `next_batch(k, pairs=True)` would have nothing to draw."""
        if not self.pairs:
            raise SystemExit("error: contrast_pairs needs swapped-tool negatives (ids \"neg:<question>|<tools>\") "
                             "whose question is also a training example; the training data has none")

    @functools.cached_property
    def kinds(self) -> tuple[list, list]:
        """(examples whose answer is a call, examples whose answer is no call)."""
        no_call = [reward.is_irrelevance(e.category) for e in self.examples]
        return ([e for e, nc in zip(self.examples, no_call) if not nc], [e for e, nc in zip(self.examples, no_call) if nc])

    def check_share(self, k: int, no_call_share: float):
        """A clear error before any training when `next_batch(k, no_call_share)` would need a missing kind."""
        call, no_call = self.kinds
        n = round(k * no_call_share) if no_call_share >= 0 else 0
        if (n and not no_call) or (no_call_share >= 0 and k - n and not call):
            raise SystemExit(f"error: no_call_share={no_call_share} needs training examples with {'no' if n else 'a'} "
                             f"call; the training data has {len(call)} with a call and {len(no_call)} without")

    def next_batch(self, k: int, no_call_share: float = -1.0, pairs: bool = False) -> list:
        """The next `k` training examples (every rank draws the same ones). no_call_share >= 0: round(k * share)
        of them come from the examples whose answer is no call and the rest from the others, each kind drawn in
        its own seeded per-epoch order (so every step sees both kinds, in the same proportion). pairs: k // 2
        swapped-tool negatives in their own order, each followed by its question with its own tools."""
        if pairs:
            self.check_pairs()
            return [e for pair in self._draw("pair_", self.pairs, k // 2) for e in pair]
        if no_call_share < 0:
            return self._draw("", self.examples, k)
        self.check_share(k, no_call_share)
        n = round(k * no_call_share)
        call, no_call = self.kinds
        return self._draw("call_", call, k - n) + self._draw("no_call_", no_call, n)

    def _draw(self, stream: str, examples: list, k: int) -> list:
        pos, epoch = f"{stream}pos", f"{stream}epoch"  # flat ints: the checkpoint stores them as plain data
        batch = []
        while len(batch) < k:
            # each stream its own order: the seed offset differs by stream name ("" keeps the original order)
            order = shuffle(examples, self.seed + self.position.setdefault(epoch, 0) + 7919 * len(stream))
            if self.position.setdefault(pos, 0) >= len(order):
                self.position.update({epoch: self.position[epoch] + 1, pos: 0})
                continue
            batch.append(order[self.position[pos]])
            self.position[pos] += 1
        return batch
