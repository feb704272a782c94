"""The SQL sandbox's worker process: memory, time and file limits, function allowlist, restarts, cleanup.

The probe set (memory, time and function bombs, file and PRAGMA writes) runs in a fresh Python process
(:func:`probe`), whose peak RSS starts low: this process has torch loaded, and its own peak says nothing.
The peak is ``VmHWM``: a process's ``ru_maxrss`` starts at the peak of the one that exec'd it (here pytest,
hundreds of MB), which would hide any growth below that.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rltk_envs import sqlite_sandbox, sqlite_worker
from rltk_envs.sql_analytics import SqlAnalyticsEnv, _data, connect
from rltk_envs.sqlite_sandbox import WALL_S, Database, SqlError

ROOT = Path(__file__).resolve().parents[1]
_WIDE = (  # 60,000 rows of 8 KB strings (no printf): hundreds of MB wherever they are sorted or buffered
    "WITH RECURSIVE w(s) AS (SELECT 'abcdefgh' UNION ALL SELECT s || s FROM w WHERE length(s) < 8000), "
    "r(i, v) AS (SELECT 1, (SELECT max(s) FROM w) UNION ALL SELECT i + 1, v FROM r LIMIT 60000) "
)
_TRIM = (  # one row whose 80 trim() calls (0.05 s each) run between two calls of the progress handler
    "WITH RECURSIVE w(s) AS (SELECT 'aaaaaaaaaa' UNION ALL SELECT s || s FROM w WHERE length(s) < 5000), "
    "t(x, y) AS (SELECT substr(max(s), 1, 4900) || substr(max(s), 1, 4900), "
    "replace(substr(max(s), 1, 800), 'a', 'b') || 'a' FROM w) "
)
MEMORY_BOMBS = {
    "sort_all": _WIDE + "SELECT i || v AS x FROM r ORDER BY x DESC",
    "sort": _WIDE + "SELECT i || v AS x FROM r ORDER BY x DESC LIMIT 1 OFFSET 59999",
    "window": _WIDE + "SELECT max(i || v) OVER (ORDER BY i DESC ROWS BETWEEN UNBOUNDED PRECEDING "
    "AND UNBOUNDED FOLLOWING) FROM r LIMIT 1",
    "union": _WIDE + "SELECT count(*) FROM (SELECT i || v FROM r UNION SELECT 'x')",
    "distinct": _WIDE + "SELECT count(DISTINCT i || v) FROM r",
}
TIME_BOMBS = {
    "endless_cte": "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r",
    "one_vm_step": _TRIM + "SELECT " + " + ".join(["length(trim(x, y))"] * 80) + " FROM t",
}
REFUSED = {
    "zeroblob": "SELECT length(zeroblob(500000000))",
    "randomblob": "SELECT length(randomblob(500000000))",
    "printf": "SELECT printf('%.*c', 2000000000, 'x')",
    "format": "SELECT format('%s', name) FROM warehouses",
    "fts3_tokenizer": "SELECT hex(fts3_tokenizer('simple'))",
    "fts3_tokenizer_set": "SELECT fts3_tokenizer('simple', x'4141414141414141')",
    "load_extension": "SELECT load_extension('libc.so.6')",
    "attach": "ATTACH DATABASE 'attached.db' AS a",
    "attach_absolute": "ATTACH DATABASE '{cwd}/attached.db' AS a",
    "vacuum_into": "VACUUM INTO 'vacuumed.db'",
    "vacuum_into_absolute": "VACUUM INTO '{cwd}/vacuumed.db'",
    "pragma_writable_schema": "PRAGMA writable_schema = 1",
    "pragma_temp_store": "PRAGMA temp_store = FILE",
    "pragma_function": "SELECT * FROM pragma_table_info('shipments')",
}
FIXED = "SELECT * FROM shipments JOIN warehouses ON warehouses.id = shipments.warehouse_id ORDER BY 1"


def _files(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*") if not p.is_dir())


def _peak_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _episodes(bomb: dict[str, str] | None, cwd: Path) -> dict[str, Any]:
    """Six episodes (tool call, then answer), with ``bomb``'s queries run in between on another database."""
    env = SqlAnalyticsEnv()
    tasks = env.tasks("eval", 6)
    episodes = [env.episode(t) for t in tasks]
    calls = [f"<tool>run_sql: {t.reference['sql']}</tool>" for t in tasks]
    observed = [ep.step(call).observation for ep, call in zip(episodes, calls, strict=True)]
    db = connect("logistics", 7)
    fixed = db.run(FIXED, 500)
    base, bombs = _peak_mb(), {}
    for i, (name, sql) in enumerate((bomb or {}).items()):
        worker = sqlite_sandbox._WORKER.proc.pid
        start = time.monotonic()
        try:
            db.run(sql.format(cwd=cwd), 10)
            error = None
        except SqlError as exc:
            error = str(exc)
        wall = time.monotonic() - start
        restarted = sqlite_sandbox._WORKER.proc is None or sqlite_sandbox._WORKER.proc.pid != worker
        j = i % len(episodes)  # another episode's query, in the same step
        observed.append(episodes[j].step(calls[j]).observation)
        unchanged = db.run(FIXED, 500) == fixed
        bombs[name] = {"error": error, "wall": wall, "restarted": restarted, "unchanged": unchanged}
        bombs[name]["files"] = _files(cwd, Path(os.environ["TMPDIR"]))
    for ep, t in zip(episodes, tasks, strict=True):
        ep.step(f"<answer>{t.reference['sql']}</answer>")
    verdicts = [ep.outcome for ep in episodes]
    return {
        "observed": observed,
        "verdicts": verdicts,
        "bombs": bombs,
        "base_mb": base,
        "peak_mb": _peak_mb() - base,
    }


def probe() -> None:
    """Run the episodes without bombs, then with every bomb (run by ``test_probe_set`` in a fresh process)."""
    cwd = Path.cwd()
    clean = _episodes({name: "SELECT 1" for name in [*MEMORY_BOMBS, *TIME_BOMBS, *REFUSED]}, cwd)
    bombed = _episodes({**MEMORY_BOMBS, **TIME_BOMBS, **REFUSED}, cwd)
    print(json.dumps({"clean": clean, "bombed": bombed}))


def test_probe_set(tmp_path: Path) -> None:
    (tmp_path / "cwd").mkdir()
    (tmp_path / "temp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "temp"), "PYTHONPATH": str(ROOT / "tests")}
    code = "import test_sqlite_sandbox; test_sqlite_sandbox.probe()"
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    clean, bombed = result["clean"], result["bombed"]
    assert bombed["observed"] == clean["observed"]  # other episodes' tool results and verdicts: unchanged
    assert bombed["verdicts"] == clean["verdicts"] and all(v["correct"] for v in clean["verdicts"])
    assert bombed["peak_mb"] <= 64, bombed["peak_mb"]  # the trainer's memory: untouched by the bombs
    for name, b in bombed["bombs"].items():
        assert b["error"], name  # every bomb is an observation
        assert b["wall"] <= WALL_S + 0.2, (name, b["wall"])
        assert b["unchanged"] and b["files"] == [], (name, b)
        expected = "not authorized|authorization denied" if name in REFUSED else "out of memory|too slow"
        assert re.fullmatch(f".*({expected}).*", b["error"]), (name, b["error"])
    bombs = bombed["bombs"]
    assert any(bombs[n]["error"] == sqlite_worker.OUT_OF_MEMORY for n in MEMORY_BOMBS), bombs
    assert bombs["one_vm_step"]["restarted"]  # out of the progress handler's reach: the parent's deadline
    print({name: round(b["wall"], 3) for name, b in bombs.items()})
    print(f"peak RSS {bombed['base_mb']:.1f} MB + {bombed['peak_mb']:.1f} MB over the probe set")


# ---- the worker process -----------------------------------------------------------------------------------


@pytest.fixture
def db() -> Database:
    sqlite_sandbox._WORKER.stop()  # a fresh worker, holding this test's databases only
    d = connect("logistics", 7)
    yield d
    d.close()


def test_the_worker_is_confined(db: Database) -> None:
    db.run("SELECT 1", 1)
    pid = sqlite_sandbox._WORKER.proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max file size\s+0\s+0", limits) and re.search(r"Max core file size\s+0\s+0", limits)
    cap = int(re.search(r"Max address space\s+(\d+)", limits).group(1))
    assert sqlite_worker.MEMORY_HEADROOM_BYTES < cap < sqlite_worker.MEMORY_HEADROOM_BYTES + 100 * 2**20
    assert "torch" not in Path(f"/proc/{pid}/maps").read_text()  # a small process: the standard library only
    home = Path(os.readlink(f"/proc/{pid}/cwd"))
    assert home != Path.cwd() and list(home.iterdir()) == []


def test_the_worker_dies_with_its_parent(tmp_path: Path) -> None:
    code = (
        "import time; from rltk_envs.sqlite_sandbox import _WORKER, Database\n"
        "Database({'t': ['x']}, {'t': [(1,)]}).run('SELECT 1', 1)\n"
        "print(_WORKER.proc.pid, flush=True); time.sleep(60)"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    pid = int(parent.stdout.readline())
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"-I"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:  # gone, or a zombie waiting for the reaper
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the worker outlived its parent")


def test_a_worker_started_from_a_short_lived_thread_outlives_it(db: Database) -> None:
    thread = threading.Thread(target=db.run, args=("SELECT 1", 1))
    thread.start()
    thread.join()
    pid = sqlite_sandbox._WORKER.proc.pid
    time.sleep(0.1)
    assert db.run("SELECT count(*) FROM warehouses", 1)[1] and sqlite_sandbox._WORKER.proc.pid == pid


def test_a_worker_that_dies_is_replaced(db: Database) -> None:
    before = db.run(FIXED, 500)
    proc = sqlite_sandbox._WORKER.proc
    proc.kill()  # between two queries
    proc.wait()
    assert db.run(FIXED, 500) == before
    errors: list[str] = []

    def run_long() -> None:
        try:
            db.run(TIME_BOMBS["one_vm_step"], 1)  # 4 s of work; the deadline is at 0.6 s
        except SqlError as exc:
            errors.append(str(exc))

    running, proc = threading.Thread(target=run_long), sqlite_sandbox._WORKER.proc
    running.start()
    time.sleep(0.15)
    proc.kill()  # during a query: that query fails (an observation), the next one runs on a fresh worker
    running.join()
    assert errors == [sqlite_worker.OUT_OF_MEMORY]
    assert db.run(FIXED, 500) == before and sqlite_sandbox._WORKER.proc is not proc


def test_a_query_interrupted_by_the_env_watchdog_leaves_no_reply_behind(db: Database) -> None:
    from rltk.deadline import CallTimeout, call_with_timeout

    before = db.run(FIXED, 500)
    proc = sqlite_sandbox._WORKER.proc
    with pytest.raises(CallTimeout):  # the rollout's watchdog fires while the worker still works
        call_with_timeout(db.run, (TIME_BOMBS["one_vm_step"], 1), {}, 0.1)
    assert db.run(FIXED, 500) == before  # not the interrupted query's late reply
    assert sqlite_sandbox._WORKER.proc is not proc


def test_queries_from_several_threads_get_their_own_results() -> None:
    dbs = [connect("hr", seed) for seed in range(4)]
    expected = [d.run("SELECT count(*), sum(amount) FROM salaries", 1)[1] for d in dbs]
    got: list[list] = [[] for _ in dbs]

    def ask(i: int) -> None:
        got[i] = [dbs[i].run("SELECT count(*), sum(amount) FROM salaries", 1)[1] for _ in range(20)]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(dbs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [[e] * 20 for e in expected] and len({str(e) for e in expected}) == len(dbs)


def test_databases_are_dropped_when_closed_collected_or_least_recent(monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite_sandbox._WORKER.stop()
    monkeypatch.setattr(sqlite_sandbox, "MAX_DATABASES", 3)
    dbs = [connect("hr", seed) for seed in range(5)]
    first = [d.run("SELECT sum(amount) FROM salaries", 1)[1] for d in dbs]
    loaded = sqlite_sandbox._WORKER.loaded
    assert list(loaded) == [d.key for d in dbs[2:]]  # the least recently used went first
    assert [d.run("SELECT sum(amount) FROM salaries", 1)[1] for d in dbs] == first  # rebuilt on demand
    closed, collected = dbs[4].key, dbs[3].key
    dbs[4].close()
    del dbs[3]
    gc.collect()
    dbs[0].run("SELECT 1", 1)  # the next request drops both
    assert closed not in loaded and collected not in loaded and len(loaded) == 2


def test_frames_carry_plain_data_only() -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("true",))

    r, w = os.pipe()
    message = ("rows", ["a", "b"], [(1, 2.5, "x", b"\0", None)])
    sqlite_worker.send(w, message)
    assert sqlite_worker.receive(r, time.monotonic() + 1) == message
    data = pickle.dumps(Exploit())
    os.write(w, len(data).to_bytes(4, "big") + data)
    with pytest.raises(pickle.UnpicklingError, match="not plain data"):
        sqlite_worker.receive(r, time.monotonic() + 1)
    with pytest.raises(TimeoutError):
        sqlite_worker.receive(r, time.monotonic() + 0.05)
    os.write(w, (sqlite_worker.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(EOFError, match="frame of"):
        sqlite_worker.receive(r, time.monotonic() + 1)
    os.close(r)
    os.close(w)


def test_a_result_too_large_for_a_frame_is_an_error(db: Database) -> None:
    wide = "(SELECT max(s) AS s FROM w), shipments"
    sql = "WITH RECURSIVE w(s) AS (SELECT 'abcdefgh' UNION ALL SELECT s || s FROM w WHERE length(s) < 8000) "
    with pytest.raises(SqlError, match="result too large"):
        db.run(sql + "SELECT " + ", ".join(["s"] * 16) + f" FROM {wide}", 50)
    assert len(db.run(sql + f"SELECT s, s FROM {wide}", 50)[1]) == 33  # narrower: fine


# ---- functions, files -------------------------------------------------------------------------------------


def test_the_allowlist_covers_the_gold_queries() -> None:
    templates = [t for family in _data()["families"].values() for t in family["templates"]]
    used = {f.lower() for t in templates for f in re.findall(r"(\w+)\(", t["sql"] + t.get("distinct", ""))}
    assert used and used <= sqlite_worker.FUNCTIONS


def test_ordinary_functions_work(db: Database) -> None:
    sql = (
        "SELECT count(*), sum(weight), total(weight), round(avg(weight), 1), min(days), max(days), "
        "abs(-1), coalesce(NULL, 1), ifnull(NULL, 2), nullif(1, 1), iif(1, 'y', 'n'), typeof(1), "
        "lower('A') || upper('b'), length('abc'), substr('abc', 2), substring('abc', 1, 1), trim(' a '), "
        "ltrim('xa', 'x'), rtrim('ax', 'x'), replace('aa', 'a', 'b'), instr('abc', 'c'), "
        "length(group_concat(DISTINCT status)) > 0 FROM shipments WHERE status LIKE '%' AND status GLOB '*'"
    )
    row = db.run(sql, 1)[1][0]
    assert row[6:] == (1, 1, 2, None, "y", "integer", "aB", 3, "bc", "a", "a", "a", "a", "bb", 3, 1)
    ranks = "row_number() OVER (ORDER BY id), rank() OVER (ORDER BY days), dense_rank() OVER (ORDER BY days)"
    assert len(db.run(f"SELECT {ranks} FROM shipments", 50)[1]) == 33


@pytest.mark.parametrize(
    "call",
    [
        *("hex(1)", "char(65)", "quote(1)", "unicode('a')", "json('[1]')", "date('now')", "random()"),
        *("sqlite_version()", "pow(2, 3)", "soundex('a')", "likelihood(1, 0.5)", "sqlite_source_id()"),
    ],
)
def test_functions_off_the_allowlist_are_refused(db: Database, call: str) -> None:
    with pytest.raises(SqlError, match="not authorized to use function"):
        db.run(f"SELECT {call}", 1)


def test_without_the_authorizer_no_file_opens_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    conn = sqlite_worker.open_readonly({"t": ["x"]}, {"t": [(1,)]})
    conn.set_authorizer(None)
    for sql in ("VACUUM INTO 'x.db'", f"VACUUM INTO '{tmp_path}/y.db'", "ATTACH 'z.db' AS z"):
        with pytest.raises(sqlite3.OperationalError, match="too many attached databases"):
            conn.execute(sql)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM t")
    assert list(tmp_path.iterdir()) == []
    conn.close()
