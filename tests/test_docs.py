"""The documentation resolves inside a clone, and the contract (docs/SPEC.md) agrees with the code.

- Every relative link of every markdown file of the repository ([text](path), ![alt](path), reference
  definitions) names a file or folder of the repository: not one outside it, not one only a local build
  or another checkout has. Links to headings (#fragment, in the same file or another markdown file) name
  a heading that exists.
- Every repository path named in a docstring or a comment (Python, C++/CUDA, shell, CMake) or in a code
  span of a markdown file resolves, relative to the repository root or to the naming file's folder. A
  token counts as a path when it contains a "/" and ends in a known extension, or starts with a top-level
  folder of the repository. Paths that are deliberately not in the repository (another project's files,
  build outputs) are listed in ALLOWED, each with its reason; an entry nothing matches any more fails.
- The worked examples of docs/SPEC.md (its spec-example blocks: inputs, options and the expected
  numbers) are recomputed with ppo_ext.policy_loss, the eager reference, the verl and ROLL adapters and
  ppo_ext.log_probs_from_logits, and must match the numbers written there (6 significant digits).
- The metric and count tables of docs/SPEC.md list ppo_ext.METRIC_NAMES and ppo_ext.COUNT_NAMES in order.
"""

import ast
import fnmatch
import io
import math
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest
import torch

import ppo_ext
from ppo_ext.compat import roll as ppo_roll
from ppo_ext.compat import verl as ppo_verl
from ppo_ext.reference import policy_loss_reference

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "SPEC.md"

# Paths named in the sources that are deliberately not in the repository: (fnmatch pattern, reason).
ALLOWED = (
    ("verl/*", "a file of verl's source tree (what the verl adapter reproduces), not of this repository"),
    ("trl/*", "a file of TRL's source tree (the eager baseline a benchmark cites)"),
    ("liger_kernel/*", "a file of Liger-Kernel's source tree (the fused linear GRPO loss a parity test runs)"),
    ("ppo_ext/_C*.so", "the compiled extension, a build output (setup.py; *.so is ignored)"),
    ("ppo_ext/.build-stamp", "written by scripts/setup_env.sh after a build, ignored"),
    ("examples/output/", "written by examples/grpo_sort_digits.py, ignored by examples/.gitignore"),
)

PATH_EXTENSIONS = (".md", ".py", ".pyi", ".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh", ".sh", ".txt",
                   ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".png", ".svg", ".csv")
TOP_LEVEL = ("docs/", "csrc/", "ppo_ext/", "tests/", "scripts/", "benchmarks/", "examples/", ".ci/")
_SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}


# ----------------------------------------------------------------------------------------------------------
# The files of a clone


def repo_files(root: Path):
    """The repository's files, relative to root, as a clone has them: tracked files and the untracked ones
    git does not ignore (new files not yet committed). Without git, every file outside build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        files = {f for f in out.split("\0") if f and (root / f).is_file()}
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".venv", "venv"))]
        for name in filenames:
            files.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return files


class Tree:
    """The files and folders of a clone, to resolve names against."""

    def __init__(self, root: Path, files):
        self.root = root
        self.files = set(files)
        self.dirs = {""}
        for f in self.files:
            parts = f.split("/")
            for k in range(1, len(parts)):
                self.dirs.add("/".join(parts[:k]))

    def exists(self, rel: str) -> bool:
        rel = rel.rstrip("/")
        if any(ch in rel for ch in "*?["):
            return any(fnmatch.fnmatchcase(p, rel) for p in self.files | self.dirs)
        return rel in self.files or rel in self.dirs

    def resolve(self, name: str, base_dir: str):
        """The repository path `name` means, relative to base_dir (a folder of the repository, "" for the root),
        or None if it does not exist or lies outside the repository."""
        joined = os.path.normpath(os.path.join(base_dir, name)).replace(os.sep, "/")
        if joined == ".":
            joined = ""
        if joined == ".." or joined.startswith("../") or os.path.isabs(joined):
            return None
        return joined if self.exists(joined) else None


# ----------------------------------------------------------------------------------------------------------
# Markdown: links, anchors, code spans

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_lines(text: str):
    """(line number, line, whether it is inside a fenced code block)."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            yield number, line, True
            continue
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
            yield number, line, True
            continue
        yield number, line, False


def markdown_links(text: str):
    """(line number, target) of every link and reference definition outside code."""
    for number, line, in_code in markdown_lines(text):
        if in_code:
            continue
        prose = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in _LINK.finditer(prose):
            yield number, m.group(1).strip("<>")
        m = _REF_DEF.match(prose)
        if m:
            yield number, m.group(1).strip("<>")


def github_slugs(text: str):
    """The anchors GitHub gives the headings of a markdown file."""
    slugs, seen = set(), {}
    for _, line, in_code in markdown_lines(text):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not m:
            continue
        title = re.sub(r"<[^>]+>", "", m.group(1))
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def check_markdown_links(tree: Tree):
    problems = []
    slugs = {}

    def anchors(rel):
        if rel not in slugs:
            slugs[rel] = github_slugs((tree.root / rel).read_text(encoding="utf-8"))
        return slugs[rel]

    for rel in sorted(f for f in tree.files if f.endswith(".md")):
        base = os.path.dirname(rel)
        for number, target in markdown_links((tree.root / rel).read_text(encoding="utf-8")):
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # http(s), mailto: not a repository path
            path, _, fragment = target.partition("#")
            path = path.split("?")[0]
            if not path:
                resolved = rel
            else:
                resolved = tree.resolve(path, base)
                if resolved is None:
                    problems.append(f"{rel}:{number}: link to {target!r} does not resolve inside the repository")
                    continue
            if fragment and resolved.endswith(".md") and resolved in tree.files and fragment not in anchors(resolved):
                problems.append(f"{rel}:{number}: link to {target!r}: {resolved} has no heading #{fragment}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Paths named in docstrings and comments


def python_texts(source: str):
    """(line number, text) of the comments and docstrings (string statements) of a Python source."""
    texts = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                texts.append((tok.start[0], tok.string))
        tree = ast.parse(source)
    except (SyntaxError, tokenize.TokenError):
        return [(1, source)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            texts.append((node.lineno, node.value.value))
    return texts


def c_texts(source: str):
    """(line number, text) of the // and /* */ comments of a C, C++ or CUDA source (string literals skipped)."""
    texts, i, n, line = [], 0, len(source), 1
    while i < n:
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
            texts.append((line, source[i:j]))
            i = j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            j = n if j < 0 else j + 2
            texts.append((line, source[i:j]))
            line += source.count("\n", i, j)
            i = j
        elif source[i] in "\"'":
            quote, j = source[i], i + 1
            while j < n and source[j] != quote and source[j] != "\n":
                j += 2 if source[j] == "\\" else 1
            i = j + 1
        else:
            line += source[i] == "\n"
            i += 1
    return texts


def hash_comment_texts(source: str):
    """(line number, text) of the # comments of a shell script or CMake file (the #! line excluded)."""
    texts = []
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith("#!"):
            continue
        if stripped.startswith("#"):
            texts.append((number, stripped))
            continue
        m = re.search(r"(?:^|\s)#\s", line)
        if m:
            texts.append((number, line[m.start():]))
    return texts


def markdown_code_texts(source: str):
    """(line number, text) of the code spans of a markdown file, outside fenced blocks."""
    return [(number, m.group(2)) for number, line, in_code in markdown_lines(source) if not in_code
            for m in _CODE_SPAN.finditer(line)]


def texts_of(rel: str, source: str):
    name = os.path.basename(rel)
    if rel.endswith(".py"):
        return python_texts(source)
    if rel.endswith((".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh")):
        return c_texts(source)
    if rel.endswith(".md"):
        return markdown_code_texts(source)
    if rel.endswith(".sh") or name == "CMakeLists.txt" or rel.startswith((".ci/", "scripts/")):
        return hash_comment_texts(source)
    return []


_PATH_TOKEN = re.compile(r"[\w.\-*?{},/]+")


def _expand_braces(token: str):
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return token.split(",") if "," in token else [token]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(token[:m.start()] + alt + token[m.end():])]


def named_paths(text: str):
    """The tokens of a text that name a file path (see the module docstring), braces expanded."""
    for m in _PATH_TOKEN.finditer(text):
        for token in _expand_braces(m.group(0)):
            token = token.lstrip(",;:").rstrip(".,;:")
            if "/" not in token or "//" in token or token.startswith("/"):
                continue
            if token.endswith(PATH_EXTENSIONS) or token.startswith(TOP_LEVEL + ("../", "./")):
                yield token


def _allowed(token: str, allowed):
    return next((pattern for pattern, _ in allowed if fnmatch.fnmatchcase(token, pattern)), None)


def check_named_paths(tree: Tree, allowed=ALLOWED):
    """(problems, the allow-list patterns that matched something)."""
    problems, used = [], set()
    for rel in sorted(tree.files):
        try:
            source = (tree.root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        base = os.path.dirname(rel)
        for start, text in texts_of(rel, source):
            for m_token in named_paths(text):
                pattern = _allowed(m_token, allowed)
                if pattern is not None:
                    used.add(pattern)
                    continue
                if tree.resolve(m_token, "") or tree.resolve(m_token, base):
                    continue
                # module.attribute notation: tests/helpers.make_inputs names tests/helpers.py
                head, _, last = m_token.rpartition("/")
                if "." in last and not m_token.endswith(PATH_EXTENSIONS):
                    module = f"{head}/{last.split('.')[0]}.py"
                    if tree.resolve(module, "") or tree.resolve(module, base):
                        continue
                line = start + text[:text.find(m_token)].count("\n") if m_token in text else start
                problems.append(f"{rel}:{line}: names {m_token!r}, which is not in the repository")
    return problems, used


# ----------------------------------------------------------------------------------------------------------
# The tests of the references


@pytest.fixture(scope="module")
def tree():
    return Tree(ROOT, repo_files(ROOT))


def test_spec_is_in_the_repository(tree):
    assert "docs/SPEC.md" in tree.files


def test_markdown_links_resolve(tree):
    problems = check_markdown_links(tree)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_paths_named_in_sources_resolve(tree):
    problems, _ = check_named_paths(tree)
    assert not problems, "paths that do not resolve inside a clone:\n" + "\n".join(problems)


def test_allow_list_entries_are_used(tree):
    _, used = check_named_paths(tree)
    stale = [pattern for pattern, _ in ALLOWED if pattern not in used]
    assert not stale, f"ALLOWED entries nothing names any more (remove them): {stale}"


def test_the_checks_catch_broken_references(tmp_path):
    """The checkers themselves, on a small tree with one broken reference of every kind."""
    files = {
        "README.md": "[ok](docs/A.md) [up](../shared/X.md) [gone](docs/B.md) [anchor](docs/A.md#nope)\n"
                     "[fine](docs/A.md#a-heading) ![img](pic.png) [web](https://example.com/x.md)\n"
                     "```\n[in code](missing.md)\n```\n`docs/missing.md` `docs/A.md`\n",
        "docs/A.md": "# A heading\n[back](../README.md) [self](#a-heading) [bad](#other)\n",
        "pkg/mod.py": '"""See docs/A.md and docs/SPEC.md; ../shared/seed/x.txt."""\n'
                      "# tests/helpers.make_inputs, pkg/{mod,other}.py, verl/trainer/ppo/core_algos.py\n"
                      'x = "docs/not_a_docstring.md"\n',
        "src/k.cpp": '// see ../docs/A.md and csrc/gone.h\nconst char* s = "// not/a/comment.h";\n',
        "tests/helpers.py": "",
        "pic.png": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    small = Tree(tmp_path, files)
    links = check_markdown_links(small)
    assert [p.split(": ", 1)[1].split(" ")[2].rstrip(":") for p in links] == [
        "'../shared/X.md'", "'docs/B.md'", "'docs/A.md#nope'", "'#other'"], links
    problems, used = check_named_paths(small, allowed=(("verl/*", "another project"),))
    named = sorted(p.split("names ")[1].split(",")[0] for p in problems)
    assert named == ["'../shared/seed/x.txt'", "'csrc/gone.h'", "'docs/SPEC.md'", "'docs/missing.md'",
                     "'pkg/other.py'"], problems
    assert used == {"verl/*"}


# ----------------------------------------------------------------------------------------------------------
# The worked examples of docs/SPEC.md


def parse_spec_examples(text: str):
    """The spec-example blocks: a list of (inputs, cases), each a dict of parsed values."""
    blocks, current = [], None
    for _, line, in_code in markdown_lines(text):
        if current is None:
            if in_code and re.match(r"^ {0,3}(`{3,}|~{3,})\s*spec-example\s*$", line):
                current = []
            continue
        if _FENCE.match(line):
            blocks.append(current)
            current = None
            continue
        current.append(line)
    examples = []
    for lines in blocks:
        entries = []
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.match(r"^([a-z_]+):\s*(.*)$", line)
            if m:
                entries.append([m.group(1), m.group(2)])
            else:
                assert line[:1].isspace() and entries, f"spec-example: cannot read {line!r}"
                entries[-1][1] += " " + line.strip()
        inputs, cases = {}, []
        for key, raw in entries:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                assert re.fullmatch(r"[A-Za-z_][\w.\-]*", raw), f"spec-example: {key}: cannot read {raw!r}"
                value = raw
            if key == "call":
                cases.append({"call": value})
            elif cases:
                cases[-1][key] = value
            else:
                inputs[key] = value
        examples.append((inputs, cases))
    return examples


EXAMPLES = parse_spec_examples(SPEC.read_text(encoding="utf-8")) if SPEC.exists() else []
CASES = [pytest.param(inputs, case, id=f"{inputs['example']}-{k}-{case['call']}")
         for inputs, cases in EXAMPLES for k, case in enumerate(cases)]
HEADERS = [pytest.param(inputs, id=inputs["example"]) for inputs, _ in EXAMPLES
           if {"ratio", "seq_ratio", "seq_log_ratio"} & inputs.keys()]


def close(expected: float, got: float) -> bool:
    """got, rounded to the significant digits written (6), is the number written (float32 slack included)."""
    if math.isnan(expected) or math.isnan(got):
        return math.isnan(expected) and math.isnan(got)
    if expected == 0:
        return abs(got) <= 1e-12
    exponent = math.floor(math.log10(abs(expected)))
    return abs(got - expected) <= 0.5 * 10.0 ** (exponent - 5) + 1e-7 * abs(expected) + 1e-15


def assert_numbers(expected, got, what):
    if isinstance(got, torch.Tensor):
        got = got.detach().cpu().tolist()
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), f"{what}: {got} != {expected}"
        for k, (e, g) in enumerate(zip(expected, got)):
            assert_numbers(e, g, f"{what}[{k}]")
        return
    assert close(float(expected), float(got)), f"{what}: computed {got!r}, docs/SPEC.md says {expected!r}"


def _tensors(spec, device):
    f64 = torch.float64
    if "ratio_input" in spec:
        lp = torch.tensor(spec["ratio_input"], dtype=f64).log()
        old = torch.zeros_like(lp)
    else:
        lp = torch.tensor(spec["log_probs"], dtype=f64)
        old = torch.tensor(spec["old_log_probs"], dtype=f64) if spec.get("old_log_probs") is not None else None
    adv = torch.tensor(spec["advantages"], dtype=f64)
    mask = torch.tensor(spec["mask"]) if spec.get("mask") is not None else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(lp), to(old), to(adv), to(mask)


def test_spec_has_the_seed_examples():
    names = [inputs["example"] for inputs, _ in EXAMPLES]
    for name in ("seed-clipfrac", "seed-token-ratio", "seed-sequence-ratio"):
        assert name in names, f"docs/SPEC.md lost its worked example {name}"
    calls = {case["call"] for _, cases in EXAMPLES for case in cases}
    assert {"policy_loss", "roll", "verl_vanilla", "verl_gspo", "log_probs_from_logits"} <= calls


@pytest.mark.parametrize("spec", HEADERS)
def test_spec_example_ratios(spec, device):
    """The per-token ratios (`ratio`) and per-row log-ratios / ratios (`seq_log_ratio`, `seq_ratio`) of an
    example, from ppo_ext.policy_loss (and the reference) restricted to one valid token, or one row."""
    lp, old, adv, mask = _tensors(spec, device)
    valid = torch.ones(lp.shape, dtype=torch.bool) if mask is None else mask.cpu() != 0
    for fn in (ppo_ext.policy_loss, policy_loss_reference):
        dev = device if fn is ppo_ext.policy_loss else "cpu"
        args = [t if t is None else t.to(dev) for t in (lp, old, adv)]
        if "ratio" in spec:
            for (i, t), expected in zip([(i, t) for i in range(lp.shape[0]) for t in range(lp.shape[1])],
                                        [x for row in spec["ratio"] for x in row]):
                one = torch.zeros(lp.shape, dtype=torch.bool, device=dev)
                one[i, t] = True
                out = fn(*args, one)
                assert_numbers(expected, out.metrics["ratio_mean"], f"{fn.__name__}: ratio[{i}][{t}]")
        for i in range(lp.shape[0]) if ("seq_ratio" in spec or "seq_log_ratio" in spec) else ():
            row = torch.zeros(lp.shape, dtype=torch.bool)
            row[i] = valid[i]
            out = fn(*args, row.to(dev), importance_sampling="seq")
            if "seq_log_ratio" in spec:
                assert_numbers(spec["seq_log_ratio"][i], -out.metrics["approx_kl"],
                               f"{fn.__name__}: seq_log_ratio[{i}]")
            if "seq_ratio" in spec:
                assert_numbers(spec["seq_ratio"][i], out.metrics["ratio_mean"], f"{fn.__name__}: seq_ratio[{i}]")


def _run_policy_loss(fn, spec, options, device):
    lp, old, adv, mask = _tensors(spec, device)
    lp.requires_grad_(True)
    out = fn(lp, old, adv, mask, **options)
    out.loss.backward()
    return out.loss, lp.grad, out.metrics, out.counts


@pytest.mark.parametrize("inputs, case", CASES)
def test_spec_worked_example(inputs, case, device):
    spec = {**inputs, **case}
    call, options = spec["call"], dict(spec.get("options", {}))
    what = f"{spec['example']} / {call}({options})"
    if call == "policy_loss":
        runs = [("ppo_ext.policy_loss", _run_policy_loss(ppo_ext.policy_loss, spec, options, device)),
                ("reference", _run_policy_loss(policy_loss_reference, spec, options, "cpu"))]
        for name, (loss, grad, metrics, counts) in runs:
            assert list(spec["metrics"]) == list(ppo_ext.METRIC_NAMES), f"{what}: list every metric, in order"
            assert len(spec["counts"]) == len(ppo_ext.COUNT_NAMES), what
            assert_numbers(spec["loss"], loss, f"{what}: {name}: loss")
            assert_numbers(spec["grad"], grad, f"{what}: {name}: grad")
            for key, expected in spec["metrics"].items():
                assert_numbers(expected, metrics[key], f"{what}: {name}: metrics[{key!r}]")
            assert counts.tolist() == spec["counts"], f"{what}: {name}: counts"
    elif call in ("roll", "verl_vanilla", "verl_gspo"):
        lp, old, adv, mask = _tensors(spec, device)
        mask = torch.ones(lp.shape, device=device) if mask is None else mask
        lp.requires_grad_(True)
        if call == "roll":
            loss, metrics = ppo_roll.compute_policy_loss(lp, old, adv, mask, **options)
            keys = ppo_roll.METRIC_KEYS
        else:
            fn = ppo_verl.compute_policy_loss_vanilla if call == "verl_vanilla" else ppo_verl.compute_policy_loss_gspo
            loss, metrics = fn(old, lp, adv, mask, **options)
            keys = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
        loss.backward()
        assert sorted(spec["metrics"]) == sorted(keys), f"{what}: list every metric key"
        assert_numbers(spec["loss"], loss, f"{what}: loss")
        if "grad" in spec:
            assert_numbers(spec["grad"], lp.grad, f"{what}: grad")
        for key, expected in spec["metrics"].items():
            assert_numbers(expected, metrics[key], f"{what}: metrics[{key!r}]")
    elif call == "log_probs_from_logits":
        logits = torch.tensor(spec["logits"], dtype=torch.float64, device=device, requires_grad=True)
        labels = torch.tensor(spec["labels"], device=device)
        log_probs, entropy = ppo_ext.log_probs_from_logits(logits, labels, **options)
        log_probs.sum().backward()
        eager = torch.tensor(spec["logits"], dtype=torch.float64, requires_grad=True)
        log_softmax = torch.log_softmax(eager / options.get("temperature", 1.0), dim=-1)
        eager_lp = log_softmax.gather(-1, labels.cpu().unsqueeze(-1)).squeeze(-1)
        eager_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        eager_lp.sum().backward()
        for name, (lp_, ent_, grad_) in (("ppo_ext", (log_probs, entropy, logits.grad)),
                                         ("eager", (eager_lp, eager_entropy, eager.grad))):
            assert_numbers(spec["log_probs"], lp_, f"{what}: {name}: log_probs")
            if "entropy" in spec:
                assert_numbers(spec["entropy"], ent_, f"{what}: {name}: entropy")
            assert_numbers(spec["grad"], grad_, f"{what}: {name}: grad")
    else:
        pytest.fail(f"{what}: unknown call {call!r} in docs/SPEC.md")


def _table_names(text: str, heading: str):
    """The backticked names of the first column of the first table after a heading."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.strip() == heading)
    names, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            first = cells[1] if cells[0].isdigit() else cells[0]  # the counts table starts with its index
            names += re.findall(r"`([a-z_]+)`", first)
        elif in_table:
            return names
    return names


def test_spec_lists_the_metrics_and_counts_in_order():
    text = SPEC.read_text(encoding="utf-8")
    names = _table_names(text, "## Metrics and counts")
    assert tuple(names) == ppo_ext.METRIC_NAMES, names
    counts_at = text.index("`counts` is an int64 tensor")
    count_names = _table_names(text[counts_at:], text[counts_at:].splitlines()[0])
    assert tuple(count_names) == ppo_ext.COUNT_NAMES, count_names
