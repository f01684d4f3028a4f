"""What the fuzzing tools (``tools/fuzz_zmoe.py``, ``tools/fuzz_convert.py``) share: JSON
mutations, the worker process that examines one input at a time under an address-space and a
time limit, and the campaign loop that feeds inputs to one or more workers and counts outcomes.

Outcomes of an input (a worker answers ``{"stages": {stage: "ok" | "skipped" | error class},
"other": None | "Type: message", "memory": bool}``):

    ok       every stage passed (the mutation was harmless or undetectable)
    refused  a stage raised an expected error naming the input (counted by class and stage)
    other    any other exception, or an expected error class not naming the input
    memory   MemoryError (an allocation of a size the input claims)
    crash    the worker died of a signal (SIGSEGV, SIGABRT...)
    hang     no answer within the time limit

Importable without numpy.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import queue
import random
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: outcomes that fail a campaign (exit status 1)
BAD = ("other", "memory", "crash", "hang")
OUTCOMES = ("ok", "refused") + BAD

# -- JSON mutations ------------------------------------------------------------------------------
#: what a "json" op does at the node it picks
JSON_ACTIONS = ("set", "set", "set", "copy", "delete", "dup", "drop")
#: text-level edits of a JSON document (what ``json.dumps`` never writes)
TEXT_KINDS = ("deep", "deep-parses", "digits", "nan", "dupkey", "badutf8", "syntax")


def paths(node, prefix=()):
    """Every (path, value) below ``node``, depth first."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) \
        else ()
    for k, v in items:
        out.append((prefix + (k,), v))
        out.extend(paths(v, prefix + (k,)))
    return out


def get(root, path):
    """The node of ``root`` at ``path`` (a tuple of keys / indices)."""
    for k in path:
        root = root[k]
    return root


def candidates(v) -> list:
    """Edge values to put where ``v`` was."""
    common = [None, True, "x", [], {}]
    if type(v) is int:
        return [0, -1, 1, v + 1, v - 1, 2 * v, v // 2, 2**31, 2**32, 2**63 - 1, 2**63, 2**64,
                -2**63, 10**30, str(v), float(v), [v], v + 4096, v - 4096, 144] + common
    if type(v) is float:
        return [0.0, -v, 1e308, 0, int(v) if v == v and abs(v) != float("inf") else 0,
                str(v)] + common
    if type(v) is str:
        return ["", v + "x", "BF16", "F32", "F16", "I32", "huffman", "zstd", "raw", "bitplane",
                "gate", "up", "down", "gate_up", 0, [v]] + common
    if type(v) is list:
        return [v[:-1], v + v[-1:], v * 2, v[::-1], [v], v[:1]] + common if v else [[0]] + common
    if type(v) is dict:
        return [dict(list(v.items())[1:]), [v]] + common
    return [False, 0, 1, "true"] + common


def json_op(doc, op, cands=candidates) -> None:
    """Apply ``op`` (``{"pick", "action", "vpick", "src"}``, :data:`JSON_ACTIONS`) to the JSON
    value ``doc`` in place: set a node to an edge value (``cands(old)``), copy another node's
    value over it, delete it, duplicate it in its list, or drop one of its list items."""
    ps = paths(doc)
    if not ps:
        return
    path, v = ps[op["pick"] % len(ps)]
    parent = get(doc, path[:-1])
    key = path[-1]
    act = op["action"]
    if act == "set":
        c = cands(v)
        parent[key] = copy.deepcopy(c[op["vpick"] % len(c)])
    elif act == "copy":   # a value from elsewhere in the document: lies that look consistent
        parent[key] = copy.deepcopy(ps[op["src"] % len(ps)][1])
    elif act == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif act == "dup" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(v))
    elif act == "drop" and isinstance(v, list) and v:
        v.pop(op["vpick"] % len(v))


_SENTINEL = "\u0000fuzz{}\u0000"


def text_op(doc, op) -> tuple[str, str] | None:
    """Put a sentinel in ``doc`` for a text-level edit (``op["kind"]`` of :data:`TEXT_KINDS`);
    returns (quoted sentinel, replacement text) for :func:`dumps`, or None (nothing to do, or a
    byte-level edit :func:`dumps` makes itself)."""
    ps = paths(doc)
    kind = op["kind"]
    if kind in ("badutf8", "syntax") or not ps:
        return None
    s = _SENTINEL.format(op["pick"])
    if kind == "dupkey":
        dicts = [p for p, v in ps if isinstance(v, dict) and v] + \
            ([()] if isinstance(doc, dict) and doc else [])
        if not dicts:
            return None
        d = get(doc, dicts[op["pick"] % len(dicts)])
        first = next(iter(d))
        d[s] = copy.deepcopy(d[first])
        return json.dumps(s), json.dumps(first)
    path, _ = ps[op["pick"] % len(ps)]
    get(doc, path[:-1])[path[-1]] = s
    text = {"deep": "[" * 100_000 + "]" * 100_000, "deep-parses": "[" * 80 + "]" * 80,
            "digits": "9" * 5000, "nan": ("NaN", "Infinity", "-Infinity", "1e400")[op["pick"] % 4]}
    return json.dumps(s), text[kind]


def dumps(doc, text_ops=(), separators=(",", ":")) -> bytes:
    """``doc`` as UTF-8 JSON with the text-level edits ``text_ops`` (see :func:`text_op`)
    applied; ``doc`` is changed (sentinels put in it)."""
    replace, raw = [], []
    for op in text_ops:
        if op["kind"] in ("badutf8", "syntax"):
            raw.append(op)
        else:
            r = text_op(doc, op)
            if r:
                replace.append(r)
    text = json.dumps(doc, separators=separators, ensure_ascii=False)
    for sentinel, new in replace:
        text = text.replace(sentinel, new)
    blob = bytearray(text.encode("utf-8"))
    for op in raw:
        if blob:
            i = op["pick"] % len(blob)
            blob[i] = 0xFF if op["kind"] == "badutf8" else ord("}]:,\"["[op["pick"] % 6])
    return bytes(blob)


def random_json_op(rng: random.Random) -> dict:
    """A random :func:`json_op`."""
    return {"pick": rng.randrange(1 << 16), "action": rng.choice(JSON_ACTIONS),
            "vpick": rng.randrange(64), "src": rng.randrange(1 << 16)}


def random_text_op(rng: random.Random) -> dict:
    """A random :func:`text_op`."""
    return {"pick": rng.randrange(1 << 16), "kind": rng.choice(TEXT_KINDS)}


# -- the worker process --------------------------------------------------------------------------
def serve(examine, warm) -> None:
    """The worker side: run ``warm()`` (raise SystemExit if the base does not examine
    cleanly), then answer :func:`examine` (one path per stdin line, one JSON line each). Anything
    else written to fd 1 (by a library) goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warm()
    proto.write("ready\n")
    for line in sys.stdin:
        proto.write(json.dumps(examine(line.rstrip("\n"))) + "\n")


def classify(res: dict) -> str:
    """The outcome of a worker's answer (see the module docstring)."""
    if res.get("memory"):
        return "memory"
    if res.get("other"):
        return "other"
    if any(v not in ("ok", "skipped") for v in res["stages"].values()):
        return "refused"
    return "ok"


class Worker:
    """A worker process (``script --worker ARGS``) with an address-space limit; :meth:`examine`
    gives each input ``timeout`` seconds and restarts the worker after a crash or a hang."""

    def __init__(self, script, memory_mb: int = 3072, start_timeout: float = 600,
                 args=(), threads: int = 2):
        self.script, self.args, self.threads = str(script), [str(a) for a in args], threads
        self.memory_mb, self.start_timeout = memory_mb, start_timeout
        self.p = None
        self.log = tempfile.TemporaryFile(mode="w+")
        self.starts = 0

    def _start(self):
        import resource
        lim = self.memory_mb << 20

        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), str(ROOT / "format")] + ([os.environ["PYTHONPATH"]]
                                                 if os.environ.get("PYTHONPATH") else [])),
            NUMBA_NUM_THREADS=str(self.threads), OMP_NUM_THREADS=str(self.threads))
        self.p = subprocess.Popen([sys.executable, self.script, "--worker", *self.args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                  text=True, bufsize=1, env=env, preexec_fn=limit)
        self.starts += 1
        line = self._readline(self.start_timeout)
        if line != "ready\n":
            self.close()
            self.log.seek(0)
            raise RuntimeError(f"fuzz worker did not start: {line!r}\n{self.log.read()[-3000:]}")

    def _readline(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        return self.p.stdout.readline() if r else None

    def examine(self, path, timeout: float = 30) -> dict:
        """``{"outcome": ok|refused|other|memory|crash|hang, ...}`` for one input."""
        if self.p is None or self.p.poll() is not None:
            self._start()
        self.log.seek(0)
        self.log.truncate()
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        line = self._readline(timeout)
        if line is None:
            self.close()
            return {"outcome": "hang", "timeout_s": timeout}
        if not line:
            rc = self.p.wait()
            self.p = None
            self.log.seek(0)
            return {"outcome": "crash", "returncode": rc, "stderr": self.log.read()[-2000:]}
        res = json.loads(line)
        res["outcome"] = classify(res)
        return res

    def close(self):
        if self.p is not None:
            if self.p.poll() is None:
                self.p.kill()
            self.p.wait()
            self.p = None


# -- the campaign --------------------------------------------------------------------------------
def campaign(make_input, write_input, new_worker, count: int, seconds: float, timeout: float,
             workers: int = 1, keep: Path | None = None, out=sys.stdout,
             progress_every: int = 200) -> dict:
    """Run up to ``count`` inputs or ``seconds``, whichever ends first, over ``workers`` worker
    processes at once, and count their outcomes.

    Args:
        make_input: ``(n) -> spec``, a JSON-able description of input ``n`` (called in order,
            in one thread, so the inputs of a seed do not depend on ``workers``).
        write_input: ``(spec, folder) -> path``: write the input under the empty ``folder``
            and return what the worker examines (a file or a folder).
        new_worker: ``() -> Worker``.
        keep: failing inputs (a copy of the file or folder) and their specs are saved here.
    Returns:
        ``{"inputs", "seconds", "outcomes": {outcome: n}, "refused_by_class",
        "refused_at_stage", "worker_starts", "failures": [spec + result, up to 100]}``.
    """
    outcomes, refusals, stages = (collections.Counter() for _ in range(3))
    failures, lock = [], threading.Lock()
    jobs: queue.Queue = queue.Queue(maxsize=2 * workers)
    t0 = time.monotonic()
    pool = [new_worker() for _ in range(workers)]
    done = [0]
    errors: list = []

    def run(w: Worker, slot: Path):
        try:
            while True:
                job = jobs.get()
                if job is None:
                    return
                n, spec = job
                folder = slot / "in"
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir()
                path = write_input(spec, folder)
                res = w.examine(path, timeout)
                o = res["outcome"]
                with lock:
                    done[0] += 1
                    outcomes[o] += 1
                    if o == "refused":
                        st, cls = next((s, c) for s, c in res["stages"].items()
                                       if c not in ("ok", "skipped"))
                        refusals[cls] += 1
                        stages[st] += 1
                    if o in BAD:
                        msg = res.get("other") or res.get("stderr", "")[-500:]
                        print(f"input {n}: {o}: {json.dumps(spec)}\n  {msg}", file=out, flush=True)
                        if len(failures) < 100:
                            failures.append({"n": n, "spec": spec, "result": res})
                        if keep:
                            keep.mkdir(parents=True, exist_ok=True)
                            dst = keep / f"{o}-{n}{Path(path).suffix}"
                            if Path(path).is_dir():
                                shutil.copytree(path, dst, dirs_exist_ok=True)
                            else:
                                shutil.copyfile(path, dst)
                            (keep / f"{o}-{n}.json").write_text(json.dumps(
                                {"spec": spec, "result": res}, indent=1))
                    if done[0] % progress_every == 0:
                        print(f"  {done[0]} inputs, {time.monotonic() - t0:.0f} s: "
                              f"{dict(outcomes)}", file=out, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            while jobs.get() is not None:   # drain, so the producer never blocks
                pass

    with tempfile.TemporaryDirectory() as d:
        threads = []
        for i, w in enumerate(pool):
            slot = Path(d) / f"w{i}"
            slot.mkdir()
            threads.append(threading.Thread(target=run, args=(w, slot), daemon=True))
            threads[-1].start()
        n = 0
        try:
            while n < count and time.monotonic() - t0 < seconds and not errors:
                spec = make_input(n)
                while True:
                    try:
                        jobs.put((n, spec), timeout=1)
                        break
                    except queue.Full:
                        if errors or not any(t.is_alive() for t in threads):
                            break
                n += 1
        finally:
            for _ in threads:
                jobs.put(None)
            for t in threads:
                t.join()
            for w in pool:
                w.close()
    if errors:
        raise errors[0]
    dt = time.monotonic() - t0
    starts = sum(w.starts for w in pool)
    print(f"{done[0]} inputs in {dt:.0f} s ({done[0] / max(dt, 1e-9):.1f}/s), {workers} "
          f"worker(s), {starts} worker start(s), limits {timeout:g} s / "
          f"{pool[0].memory_mb} MiB per input", file=out)
    print("  outcome   inputs", file=out)
    for o in OUTCOMES:
        print(f"  {o:8s} {outcomes[o]:7d}", file=out)
    if refusals:
        print("  refused by class: " + ", ".join(f"{k} {v}" for k, v in refusals.most_common()),
              file=out)
        print("  refused at stage: " + ", ".join(f"{k} {v}" for k, v in stages.most_common()),
              file=out)
    return {"inputs": done[0], "seconds": round(dt, 1), "workers": workers,
            "worker_starts": starts, "outcomes": {o: outcomes[o] for o in OUTCOMES},
            "refused_by_class": dict(refusals.most_common()),
            "refused_at_stage": dict(stages.most_common()), "failures": failures}
