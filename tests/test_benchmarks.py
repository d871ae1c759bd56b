"""The benchmark suite cannot rot: every registered optimizer has a benchmark, and the asv
benchmark modules import and their set-ups run."""
import importlib
import os
import sys

import pytest

from qnref.optim import load_all

ROOT = os.path.join(os.path.dirname(__file__), "..", "asv_bench")
DOCS = os.path.join(ROOT, "..", "docs", "benchmarks.md")
TESTDATA = os.path.join(ROOT, "testdata", "results")

# the commands of docs/benchmarks.md that the tests below run (with a temporary results folder)
DOC_COMMANDS = [
    'asv run --python=same --quick -b "ProductRatios.track_hvp_over_grad"',
    'asv run --python=same --quick -b "ProductRatios" --set-commit-hash $(git rev-parse HEAD)',
    "asv run HEAD^!",
    'asv continuous --factor 1.1 -b "AutoencoderProducts|ProductRatios" <base> HEAD',
    "asv show HEAD",
    "asv compare --factor 1.1 <base> HEAD",
    "python tools/asv_publish_offline.py",
    "python -m asv_bench.claims --commit HEAD --write-docs",
]


def _conf():
    import json

    with open(os.path.join(ROOT, "asv.conf.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, ROOT)
    try:
        yield importlib.import_module("benchmarks.bench_optimizers")
    finally:
        sys.path.remove(ROOT)


def test_every_registered_optimizer_has_a_benchmark(benchmarks):
    registered = set(load_all())
    for cls in (benchmarks.OptimizerStep, benchmarks.OptimizerCounts, benchmarks.OptimizerRatios):
        assert set(cls.params[0]) == registered


def test_optimizer_benchmarks_run_one_step_each(benchmarks):
    for name in sorted(load_all()):
        b = benchmarks.OptimizerStep()
        b.setup(name)
        b.time_step(name)
        passes = benchmarks.OptimizerCounts().track_passes_per_step(name)
        assert passes > 0


def test_asv_configuration_builds_each_commit():
    """asv builds and installs each commit into its own virtualenv, with pinned dependencies and
    torch 2.13.0 for the ratio benchmarks (docs/benchmarks.md, "Environments")."""
    conf = _conf()
    assert conf["environment_type"] == "virtualenv" and conf["repo"] == ".." and conf["dvcs"] == "git"
    req = conf["matrix"]["req"]
    assert req["torch"] == ["2.13.0"]
    for dep in ("numpy", "scipy", "numba", "threadpoolctl"):
        assert len(req[dep]) == 1 and req[dep][0], dep  # one pinned version each
    assert "{build_dir}" in conf["build_command"][0] and "--no-deps" in conf["build_command"][0]
    assert any("--force-reinstall" in c and "{wheel_file}" in c for c in conf["install_command"])
    ignored = open(os.path.join(ROOT, "..", ".gitignore")).read().split()
    for d in ("results", "html", "env"):
        assert f"asv_bench/{d}/" in ignored


def test_documented_commands_are_the_tested_ones():
    """Every command these tests (and tools/asv_regression_demo.sh) run is in docs/benchmarks.md."""
    doc = open(DOCS).read()
    for cmd in DOC_COMMANDS:
        assert cmd in doc, cmd
    demo = open(os.path.join(ROOT, "..", "tools", "asv_regression_demo.sh")).read()
    assert 'asv continuous --factor "$FACTOR" -b "$BENCH"' in demo


def test_asv_check_discovers_every_benchmark():
    """`asv check` imports every benchmark module and validates names/params (CI keeps them alive)."""
    import shutil
    import subprocess

    asv = shutil.which("asv")
    assert asv is not None, "asv is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([asv, "check", "--python=same"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "No problems found" in r.stdout, r.stdout + r.stderr


def test_quick_subset_of_family_benchmarks_runs():
    sys.path.insert(0, ROOT)
    try:
        fam = importlib.import_module("benchmarks.bench_families")
        eng = importlib.import_module("benchmarks.bench_engine")
        scal = importlib.import_module("benchmarks.bench_lsr1_scaling")
    finally:
        sys.path.remove(ROOT)
    assert fam.MBLSR1Evaluations().track_evals_per_step() >= 1
    counts = eng.ProductPasses()
    counts.setup()
    assert counts.track_passes_grad() == 1.0 and counts.track_passes_hvp() == 2.0 and counts.track_passes_ggn() == 1.5
    b = scal.LSR1Overhead()
    b.setup(20_000, 5)
    b.time_lsr1_iteration(20_000, 5)
    assert b.track_lsr1_matvec_flops(20_000, 5) == (4 * 5 + 1) * 20_000 + 25


# -- the documented asv commands, on a temporary copy of the configuration -----------------------
def _asv(args, cwd, timeout=300, ok=(0,), env_extra=None):
    """asv with HOME in the temporary folder, so `asv machine` leaves ~/.asv-machine.json alone."""
    import shutil
    import subprocess

    asv = shutil.which("asv")
    assert asv is not None, "asv is a test dependency (pip install -e '.[test]')"
    env = dict(os.environ, HOME=str(cwd), **(env_extra or {}))
    env.setdefault("PIP_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pip"))  # keep pip's cache
    r = subprocess.run([asv] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode in ok, " ".join(args) + "\n" + r.stdout + r.stderr
    return r.stdout


def _tmp_conf(tmp_path, **over):
    import json

    conf = _conf()
    root = os.path.abspath(os.path.join(ROOT, ".."))
    conf.update(repo=root, benchmark_dir=os.path.join(os.path.abspath(ROOT), "benchmarks"),
                results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"), env_dir=str(tmp_path / "env"))
    conf.update(over)
    path = tmp_path / "asv.conf.json"
    path.write_text(json.dumps(conf))
    return str(path)


def _git(*args):
    import subprocess

    return subprocess.run(["git", *args], cwd=os.path.join(ROOT, ".."), capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def saved_results(tmp_path_factory):
    """The working-tree fast path with results saved (--set-commit-hash) under HEAD's hash (a
    label: the tree is measured; the honest per-commit run is `asv run <commit>^!`, exercised with
    QNREF_ASV_BUILD=1)."""
    tmp = tmp_path_factory.mktemp("asv")
    conf = _tmp_conf(tmp)
    _asv(["machine", "--yes", "--machine", "testvm", "--config", conf], cwd=str(tmp))
    head = _git("rev-parse", "HEAD")
    # a shell pinned to 1 thread must not leak into the record (--python=same sets no ASV=true)
    one = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "QNREF_NUM_THREADS")}
    out = _asv(["run", "--python=same", "--quick", "-b", "BenchmarkProcess.track_blas_threads", "--set-commit-hash",
                head, "--machine", "testvm", "--config", conf], cwd=str(tmp), env_extra=one)
    assert "track_blas_threads" in out
    return tmp, conf, head


def test_working_tree_run_saves_results_and_show_compare_read_them(saved_results):
    tmp, conf, head = saved_results
    files = sorted(os.listdir(tmp / "results" / "testvm"))
    assert any(f.startswith(head[:8]) for f in files), files
    shown = _asv(["show", head[:8], "--machine", "testvm", "--config", conf], cwd=str(tmp))
    assert "bench_process.BenchmarkProcess.track_blas_threads" in shown and "\n  2\n" in shown
    compared = _asv(["compare", "--factor", "1.1", head[:8], head[:8], "--machine", "testvm", "--config", conf],
                    cwd=str(tmp))
    assert "bench_process.BenchmarkProcess.track_blas_threads" in compared


def test_claims_checker_reads_a_fresh_asv_result(saved_results):
    """End to end: the file `asv run` just wrote, read back by the checker (asv's true format)."""
    from asv_bench import claims

    tmp, conf, head = saved_results
    machine, chash, env, paths = claims.select(str(tmp / "results"), "testvm", head)
    assert chash == head and env.startswith("existing")
    m = claims.Measured.load(paths, str(tmp / "results" / "benchmarks.json"))
    rows = dict((c.text, o) for c, o in claims.evaluate(m))
    assert rows["BLAS threads pinned per process"].verdict == claims.PASS
    assert rows["gradient = 1 gradient-equivalent pass"].verdict == claims.MISSING


def test_publish_writes_a_dashboard_without_cdn_scripts(saved_results):
    import re
    import subprocess

    tmp, conf, head = saved_results
    html = tmp / "html"
    script = os.path.join(ROOT, "..", "tools", "asv_publish_offline.py")
    r = subprocess.run([sys.executable, script, "--config", conf, "--html-dir", str(html)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    index = (html / "index.html").read_text()
    assert not re.search(r'<(script|link)\b[^>]*(src|href)="https?://', index)
    for name in re.findall(r'<script[^>]*src="(vendor/[^"]+)"', index) + re.findall(r'href="(vendor/[^"]+)"', index):
        assert (html / name).is_file(), name
    assert (html / "index.json").is_file() and (html / "fonts" / "glyphicons-halflings-regular.woff").is_file()


@pytest.mark.skipif(os.environ.get("QNREF_ASV_BUILD") != "1",
                    reason="builds a virtualenv and two commits (minutes): set QNREF_ASV_BUILD=1")
def test_continuous_builds_two_commits_in_the_virtualenv(tmp_path):
    """`asv run HEAD^!` and `asv continuous <base> HEAD` in asv's own virtualenv (torch 2.13.0)."""
    conf = _tmp_conf(tmp_path, env_dir=os.environ.get("QNREF_ASV_ENV_DIR", str(tmp_path / "env")))
    _asv(["machine", "--yes", "--machine", "testvm", "--config", conf], cwd=str(tmp_path))
    out = _asv(["run", "--quick", "-b", "ProductPasses", "--machine", "testvm", "--config", conf, "HEAD^!"],
               cwd=str(tmp_path), timeout=1800)
    assert "track_passes_hvp" in out
    out = _asv(["continuous", "--factor", "1.1", "-b", "ProductPasses", "--machine", "testvm", "--config", conf,
                "HEAD~1", "HEAD"], cwd=str(tmp_path), timeout=1800)
    assert "BENCHMARKS NOT SIGNIFICANTLY CHANGED" in out or "PERFORMANCE" in out, out


# -- the claims checker on a trimmed real results file ---------------------------------------------
def _sample_measured(edit=None):
    import glob
    import json

    from asv_bench import claims

    (path,) = [p for p in glob.glob(os.path.join(TESTDATA, "vm", "*.json")) if not p.endswith("machine.json")]
    if edit is None:
        return claims.Measured.load([path], os.path.join(TESTDATA, "benchmarks.json"))
    import tempfile

    d = json.load(open(path))
    edit(d["results"])
    tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(d, tmp)
    tmp.close()
    return claims.Measured.load([tmp.name], os.path.join(TESTDATA, "benchmarks.json"))


def _verdicts(m):
    from asv_bench import claims

    return {(c.text, c.benchmark): o for c, o in claims.evaluate(m)}


def _row(v, text, bench_part=""):
    (o,) = [o for (t, b), o in v.items() if t == text and bench_part in b]
    return o


def test_claims_checker_on_a_real_results_file():
    """asv_bench/testdata: a file written by `asv run` on this machine (quick run plus one
    full-statistics benchmark), trimmed to a few benchmarks."""
    from asv_bench import claims

    v = _verdicts(_sample_measured())
    assert _row(v, "gradient = 1 gradient-equivalent pass").verdict == claims.PASS
    assert _row(v, "Hv = 2 gradient-equivalent passes").verdict == claims.PASS
    o = _row(v, "B v costs (4m+1)n + O(m²) multiplications ([RD16] §3)")
    assert o.verdict == claims.PASS and o.measured.startswith("6/6 exact")
    assert _row(v, "default (cached Grams) step: (14m+10)n + O(m³)").verdict == claims.PASS
    assert _row(v, "lsr1-tr: 2 passes per step (f, ∇f at x and x+s)").verdict == claims.PASS
    # a time claim from a --quick result (one sample) is not judged
    assert _row(v, "autoencoder 784-…-784, batch 1000, float32: gradient").verdict == claims.NEEDS_FULL
    # not in the file
    assert _row(v, "goal: qnref ≤ 1.5 × torch, ResNet-20").verdict == claims.MISSING


def test_claims_checker_judges_targets_and_statistics():
    from asv_bench import claims

    def edit(res):
        res["bench_engine.ProductPasses.track_passes_hvp"][0] = [2.5]  # a wrong count
        matvec = res["bench_lsr1_scaling.LSR1Overhead.track_lsr1_matvec_flops"]
        matvec[0][0] += 1  # one flop off at (n, m) = (20000, 5)
        fb = res["bench_engine.AutoencoderProducts.time_forward_backward"]
        fb[0] = [0.1]
        while len(fb) < 11:
            fb.append(None)
        fb[10] = [20]  # stats_repeat: 20 samples = full statistics, 100 ms ≤ 120 ms budget

    v = _verdicts(_sample_measured(edit))
    assert _row(v, "Hv = 2 gradient-equivalent passes").verdict == claims.FAIL
    o = _row(v, "B v costs (4m+1)n + O(m²) multiplications ([RD16] §3)")
    assert o.verdict == claims.FAIL and o.measured.startswith("5/6 exact")
    o = _row(v, "autoencoder 784-…-784, batch 1000, float32: gradient")
    assert o.verdict == claims.PASS and o.measured == "100 ms"


def test_claims_checker_writes_the_docs_tables(tmp_path):
    """Every marked block of docs/benchmarks.md is written from the results; the text between
    the blocks is kept."""
    from asv_bench import claims

    m = _sample_measured()
    rows = claims.evaluate(m)
    doc = tmp_path / "benchmarks.md"
    original = open(DOCS).read()
    doc.write_text(original)
    seen = claims.write_docs(rows, "SOURCE LINE", str(doc), m)
    assert set(seen) == set(claims.SECTIONS) | set(claims.RECORDS) | {"source"}
    new = doc.read_text()
    assert "SOURCE LINE" in new and "| Hv = 2 gradient-equivalent passes | `ProductPasses.track_passes_hvp` | 2 |" in new
    strip = lambda t: claims.MARK.sub(lambda mo: mo.group(1) + mo.group(4), t)  # noqa: E731
    assert strip(new) == strip(original)
    # every claim appears in exactly one section's table
    for c, _ in rows:
        assert c.section in claims.SECTIONS


def test_claims_cli_prints_the_table(capsys):
    from asv_bench import claims

    import glob

    (path,) = [p for p in glob.glob(os.path.join(TESTDATA, "vm", "*.json")) if not p.endswith("machine.json")]
    assert claims.main(["--file", path]) == 0
    out = capsys.readouterr().out
    assert "| claim | benchmark | measured | target | run | result |" in out and "pass:" in out
    # the sample's float32 Hv/gradient ratio (5.14, a quick run on a loaded machine) fails its target
    assert claims.main(["--file", path, "--strict"]) == 1


def test_every_time_benchmark_states_its_policy():
    """Warm-up and repeat policy on every `time_` benchmark; a version where the code changed."""
    import inspect

    sys.path.insert(0, ROOT)
    try:
        import benchmarks._common as common

        mods = [importlib.import_module(f"benchmarks.{n}") for n in
                ("bench_engine", "bench_cnn", "bench_lsr1_scaling", "bench_optimizers", "bench_families")]
    finally:
        sys.path.remove(ROOT)
    found = 0
    for mod in mods:
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            if any(n.startswith("time_") for n in dir(cls)):
                found += 1
                assert issubclass(cls, (common.FastTiming, common.SlowTiming)), cls
                for attr in ("warmup_time", "repeat", "number", "min_run_count", "rounds", "version"):
                    assert hasattr(cls, attr), (cls, attr)
    assert found >= 5
