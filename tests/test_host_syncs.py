"""Host syncs per optimizer step stay within the table of docs/gpu.md.

A host sync is a device→host transfer of a value that steers control flow on the host (``float()``,
``bool()``, ``int()``, ``.item()``, ``.get()`` of a device array). On a GPU each one waits for the
queued kernels, so the design asks for few per step. The recording device backend of
:mod:`cupy_recording` counts them while every registered optimizer runs 5 steps on the reference
MLP (300 examples); the count of the first step and the largest count of steps 2–5 must not exceed
the bounds of the table "Host syncs per step" in docs/gpu.md (measured counts, with slack only
where the count depends on the data: line-search trials, trust-region retries, CG iterations).

``python tests/test_host_syncs.py`` prints the measured table (and, with ``--sites``, where each
sync happens) to paste into docs/gpu.md after an intended change.
"""
from __future__ import annotations

import collections
import pathlib
import re
import sys

import pytest

import cupy_recording as cr

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gpu.md"
ROW = re.compile(r"^\|\s*`([\w-]+)`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|")


def documented() -> dict[str, tuple[int, int]]:
    """optimizer → (bound for step 1, bound for each of steps 2–5), from docs/gpu.md."""
    text = DOC.read_text() if DOC.exists() else ""
    section = text.split("## Host syncs per step", 1)[-1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            out[m.group(1)] = (int(m.group(4)), int(m.group(5)))
    return out


def measured() -> dict[str, tuple[int, int]]:
    """optimizer → (syncs in step 1, most syncs in one of steps 2–5)."""
    return {n: (r.syncs_per_step[0], max(r.syncs_per_step[1:])) for n, r in cr.optimizer_runs().items() if not r.error}


def test_table_lists_every_registered_optimizer():
    from qnref.optim import load_all

    table = documented()
    assert set(table) == set(load_all()), (
        f"docs/gpu.md 'Host syncs per step' lacks {sorted(set(load_all()) - set(table))} "
        f"and lists unknown {sorted(set(table) - set(load_all()))}; measure with `python tests/test_host_syncs.py`"
    )


@pytest.mark.parametrize("name", sorted(documented()))
def test_syncs_per_step_within_documented_bound(name):
    runs = cr.optimizer_runs()
    if name not in runs:
        pytest.skip(f"{name} is not registered")
    run = runs[name]
    assert run.error is None, run.error
    first, later = documented()[name]
    counts = run.syncs_per_step
    assert len(counts) == 5
    sites = collections.Counter()
    for (phase, what, site), n in run.recorder.sync_sites.items():
        sites[f"{phase} {what} {site}"] += n
    where = "\n".join(f"  {n:3d} × {k}" for k, n in sorted(sites.items()))
    assert counts[0] <= first, f"{name}: {counts[0]} host syncs in step 1 > {first} documented\n{where}"
    assert max(counts[1:]) <= later, f"{name}: {counts[1:]} host syncs in steps 2–5 > {later} documented\n{where}"


def test_a_sync_is_counted_once_per_conversion():
    """The counter itself: float(), bool(), .item() and .get() of a device array count one each;
    device-side arithmetic, indexing with device scalars and shapes count none."""
    import numpy as np

    probe = (
        "from qnref import backend\n"
        "def probe(x):\n"
        "    xp = backend.namespace(x)\n"
        "    s = x.sum(); t = x[x.argmax()] * 2.0 + s; n = int(x.shape[0])\n"
        "    return float(s), bool(t > 0), x.max().item(), x.get(), n\n"
    )
    ns: dict = {}
    exec(compile(probe, f"{cr.QNREF_DIR}/_sync_probe.py", "exec"), ns)
    rec = cr.Recorder()
    with cr.recording_backend(rec), rec.in_phase("p"):
        ns["probe"](cr.to_device(np.arange(5.0)))
    assert rec.syncs["p"] == 4, rec.sync_sites


def table(sites: bool = False) -> str:
    rows = ["| optimizer | step 1 | steps 2–5 (max) | bound step 1 | bound steps 2–5 |", "|---|---:|---:|---:|---:|"]
    for name, run in cr.optimizer_runs().items():
        if run.error:
            rows.append(f"| `{name}` | error: {run.error} | | | |")
            continue
        rows.append(f"| `{name}` | {run.syncs_per_step[0]} | {max(run.syncs_per_step[1:])} | | |")
        if sites:
            agg = collections.Counter()
            for (phase, what, site), n in run.recorder.sync_sites.items():
                if phase == "step1":
                    agg[(what, site)] += n
            rows += [f"|   | {n} × {w} at {s} | | | |" for (w, s), n in sorted(agg.items(), key=lambda t: -t[1])]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sites="--sites" in sys.argv))
