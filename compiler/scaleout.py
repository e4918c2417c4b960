"""Sharded statistics on worker processes or a Ray cluster: `--workers N`, `--ray ADDRESS|auto`.

A pass's statistics loop (int8's calibration histograms, pruning's dense Gram matrices) is
`passes._lib.graph.run_shards(options, model, extra, work, shards, job, take)`: `work(session, shard,
job)` is a module-level function of the pass that computes one shard's statistics on a session of
`model` (fetching the values `extra` too), and `take(index, statistics)` merges them. The compiler injects one of these runners as
`options["shard_runner"]`; all of them hand `take` the shards' results **in shard index order**, so
the merged statistics are the same to the bit whatever the number of workers:

* `InProcess` (`--workers 1`, the default): one session, the shards one after another;
* `Processes` (`--workers N`): N spawned worker processes, each making its session once from the
  model's picklable parts (the same skeleton and weights as this process would use) and then taking
  one shard at a time;
* `RayTasks` (`--ray ADDRESS|auto`): one Ray task per shard (`ray.init(address=...)`; `auto`
  connects to the cluster this machine belongs to, or starts a local one), each worker process
  making its session once (cached by the model's object reference).

Every worker session has `threads` intra-op threads (`--threads`; default: this machine's cores over
the workers, 1 for Ray). Files of a shard are read by its worker, never by this process.

Faults: a worker that dies or raises is retried (a new worker process, or Ray's task retry) up to
RETRIES more times; its shard's result is taken once, when a try succeeds, so nothing is lost or
counted twice. A shard failing every try ends the compile with one line naming its files. Bad data
found by a worker (CalibrationError: NaN, a file changed since it was checked) is the user's error,
not a fault: it is said at once, never retried. Ctrl-C (or SIGTERM) stops every worker and cancels
every task; the compile then writes nothing. Test hook: `ONNXOPT_TEST_KILL_SHARD=K` makes the
worker that takes shard K exit once (`K:always`: on every try).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import tempfile
from collections import deque

from onnxopt import verify
from onnxopt.errors import CompileError
from onnxopt.passes._lib.graph import session_of
from onnxopt.passes.int8.calibration_data import CalibrationError

RETRIES = 2  # tries after the first
KILL_ENV = "ONNXOPT_TEST_KILL_SHARD"
RAY_EXTRA = 'pip install "onnxopt[ray]"'
_KILLED_EXIT = 17


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_ray() -> None:
    """Ray is importable, else one line naming the extra that installs it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CompileError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None


def make_runner(opts):
    """The shard runner `opts` ask for (`workers`, `ray`, `threads`)."""
    if opts.ray is not None:
        return RayTasks(opts.ray, opts.workers if opts.workers > 1 else None, opts.threads or 1)
    threads = opts.threads or max(1, cores() // opts.workers)
    return Processes(opts.workers, threads) if opts.workers > 1 else InProcess(threads)


class _Ordered:
    """Results handed to `take` in shard index order, whatever order they arrive in."""

    def __init__(self, take):
        self.take, self.next, self.waiting = take, 0, {}

    def put(self, index: int, result) -> None:
        self.waiting[index] = result
        while self.next in self.waiting:
            self.take(self.next, self.waiting.pop(self.next))
            self.next += 1


class InProcess:
    """The shards one after another on one session in this process."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, model, extra, work, shards, job, take, *, optimize: bool = False) -> None:
        session = verify.session_from_parts(session_of(model, verify.session_parts, extra), optimize, self.threads)
        for i, shard in enumerate(shards):
            take(i, work(session, shard, job))

    def close(self) -> None:
        pass


# ---- what a worker does with one shard (a worker process or a Ray task) ------------------------

def _test_kill(index: int, kill) -> None:
    """The fault-injection hook: exit this worker process if it takes shard `kill[0]` (once: the
    first try creates the marker file `kill[1]`; every time when there is no marker)."""
    if kill is None or index != kill[0]:
        return
    marker = kill[1]
    if marker is not None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os._exit(_KILLED_EXIT)


def _attempt(session, work, shard, job, kill):
    """("ok", result) or ("data", message) for bad data; any other exception propagates (a fault)."""
    _test_kill(shard.index, kill)
    try:
        return "ok", work(session, shard, job)
    except CalibrationError as exc:
        return "data", str(exc)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _kill_hook():
    """(shard index, marker path or None) from ONNXOPT_TEST_KILL_SHARD, or None."""
    value = os.environ.get(KILL_ENV)
    if not value:
        yield None
        return
    index, _, mode = value.partition(":")
    folder = tempfile.mkdtemp(prefix="onnxopt-kill-")
    try:
        yield int(index), None if mode == "always" else os.path.join(folder, "killed")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _failed(shard, tries: int, why: str) -> CompileError:
    return CompileError(f"calibration {shard.describe()} failed on every try ({tries}): {why}")


# ---- local worker processes ----------------------------------------------------------------------

def _worker_main(conn, parts_file: str, optimize: bool, threads: int, kill) -> None:
    """A worker process: one session (its parts read from the driver's file), then shards until
    told to stop. Ctrl-C goes to the driver, which stops the workers itself; a driver gone away
    ends the worker quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(parts_file, "rb") as f:
            session = verify.session_from_parts(pickle.load(f), optimize, threads)
    except Exception as exc:  # noqa: BLE001 - said by the driver, in one line
        conn.send(("fatal", _line(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            return
        if task is None:
            return
        work, shard, job = task
        try:
            conn.send(_attempt(session, work, shard, job, kill))
        except (EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - a fault: the driver retries the shard
            conn.send(("error", _line(exc)))


class _Worker:
    def __init__(self, ctx, parts_file, optimize, threads, kill):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, parts_file, optimize, threads, kill), daemon=True)
        self.proc.start()
        child.close()
        self.shard = None
        self.ready = False

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5)
        self.conn.close()


class Processes:
    """`workers` spawned processes, one shard each at a time; a dead worker is replaced and its
    shard given to the next free one."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads

    def __call__(self, model, extra, work, shards, job, take, *, optimize: bool = False) -> None:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("spawn")  # no fork of a process with onnxruntime's threads
        ordered = _Ordered(take)
        tries: dict[int, int] = {}
        queue: deque = deque()  # shards to run again, first
        source = iter(shards)
        exhausted = False
        # Results wait in `ordered` until the shards before them are in; do not run too far ahead.
        window = 2 * self.workers
        with _kill_hook() as kill, tempfile.TemporaryDirectory(prefix="onnxopt-workers-") as tmp:
            # The session's parts, written once for every worker to read (not pickled down each pipe).
            parts = os.path.join(tmp, "session.pickle")
            with open(parts, "wb") as f:
                pickle.dump(session_of(model, verify.session_parts, extra), f, protocol=5)
            pool = [_Worker(ctx, parts, optimize, self.threads, kill) for _ in range(self.workers)]
            try:
                while True:
                    for w in pool:
                        if w.ready and w.shard is None:
                            if not queue and not exhausted and (ordered.next + window > _next_index(tries)):
                                shard = next(source, None)
                                if shard is None:
                                    exhausted = True
                                else:
                                    queue.append(shard)
                            if queue:
                                w.shard = queue.popleft()
                                tries[w.shard.index] = tries.get(w.shard.index, 0) + 1
                                w.conn.send((work, w.shard, job))
                    if exhausted and not queue and all(w.shard is None for w in pool):
                        return
                    ready = wait([w.conn for w in pool] + [w.proc.sentinel for w in pool])
                    for i, w in enumerate(pool):
                        if w.conn not in ready and w.proc.sentinel not in ready:
                            continue
                        message = _receive(w)
                        if message is None and w.proc.is_alive():
                            continue
                        if message is None or message[0] == "error":  # died, or raised: a fault
                            why = message[1] if message else f"worker process exited with code {w.proc.exitcode}"
                            shard, w.shard = w.shard, None
                            if message is None:
                                if not w.ready:  # it could not even start: so would its replacement
                                    raise CompileError(f"a calibration worker failed to start: {why}")
                                w.stop()
                                pool[i] = _Worker(ctx, parts, optimize, self.threads, kill)
                            if shard is None:
                                continue
                            if tries[shard.index] > RETRIES:
                                raise _failed(shard, tries[shard.index], why)
                            queue.appendleft(shard)
                        elif message[0] == "fatal":
                            raise CompileError(f"a calibration worker cannot make its onnxruntime session: {message[1]}")
                        elif message[0] == "ready":
                            w.ready = True
                        elif message[0] == "data":
                            raise CalibrationError(message[1])
                        else:
                            index, w.shard = w.shard.index, None
                            ordered.put(index, message[1])
            finally:
                for w in pool:
                    w.stop()

    def close(self) -> None:
        pass


def _receive(w: _Worker):
    """The worker's next message, or None when it has none (it died, or nothing arrived yet)."""
    try:
        return w.conn.recv() if w.conn.poll() else None
    except (EOFError, OSError):
        return None


def _next_index(tries: dict[int, int]) -> int:
    return max(tries, default=-1) + 1


# ---- Ray -----------------------------------------------------------------------------------------

_SESSIONS: dict = {}  # in a Ray worker process: the session of the last model seen, by its object id


def _ray_shard(key: str, boxed_parts: list, optimize: bool, threads: int, work, shard, job, kill):
    """One shard as a Ray task. `boxed_parts` holds the model's object reference (boxed, so Ray does
    not fetch it for every task); the worker process makes the session once."""
    session = _SESSIONS.get(key)
    if session is None:
        import ray

        _SESSIONS.clear()
        session = _SESSIONS[key] = verify.session_from_parts(ray.get(boxed_parts[0]), optimize, threads)
    return _attempt(session, work, shard, job, kill)


def connect(address: str) -> bool:
    """Ray initialized for `address` ("auto": this machine's cluster, or a new local one). True when
    this call initialized it (and `disconnect` must shut it down)."""
    check_ray()
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    try:
        ray.init(address=address, **quiet)
    except ConnectionError:
        if address != "auto":
            raise CompileError(f"--ray {address}: no Ray cluster answers there") from None
        ray.init(include_dashboard=False, **quiet)  # no cluster: a local one on this machine
    except Exception as exc:  # noqa: BLE001 - a bad address is the user's, said in one line
        raise CompileError(f"--ray {address}: cannot connect ({_line(exc)})") from None
    return True


class RayTasks:
    """One Ray task per shard, at most `workers` in flight (default: the cluster's CPUs over the
    threads); retried by Ray when its worker dies or it raises."""

    def __init__(self, address: str, workers: int | None, threads: int):
        self.started = connect(address)
        import ray

        self.threads = threads
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)

    def __call__(self, model, extra, work, shards, job, take, *, optimize: bool = False) -> None:
        import ray

        parts = ray.put(session_of(model, verify.session_parts, extra))
        task = ray.remote(_ray_shard).options(num_cpus=self.threads, max_retries=RETRIES, retry_exceptions=True)
        ordered = _Ordered(take)
        flying: dict = {}
        source = iter(shards)
        with _kill_hook() as kill:
            try:
                for shard in source:
                    flying[task.remote(parts.hex(), [parts], optimize, self.threads, work, shard, job, kill)] = shard
                    while len(flying) >= self.workers or ordered.next + 2 * self.workers <= shard.index:
                        if not self._collect(flying, ordered):
                            break
                while flying:
                    self._collect(flying, ordered)
            except BaseException:
                for ref in flying:
                    ray.cancel(ref, force=True)
                raise

    def _collect(self, flying: dict, ordered: _Ordered) -> bool:
        import ray

        if not flying:
            return False
        done, _ = ray.wait(list(flying), num_returns=1)
        for ref in done:
            shard = flying.pop(ref)
            try:
                status, value = ray.get(ref)
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None)
                raise _failed(shard, RETRIES + 1, _line(cause) if cause is not None else _line(exc)) from None
            if status == "data":
                raise CalibrationError(value)
            ordered.put(shard.index, value)
        return True

    def close(self) -> None:
        disconnect(self.started)


def each_node(fn, *args) -> list[tuple[dict, object]]:
    """`fn(*args)` once on every alive node of the connected cluster, each call a task pinned to its
    node (node-affinity scheduling, not soft: a node that goes away fails its task); [(node, result)]
    in the cluster's node order, `node` Ray's description of it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(fn)
    # All of a node's CPUs: nothing else runs beside a benchmark there.
    refs = [task.options(num_cpus=n.get("Resources", {}).get("CPU", 1),
                         scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    try:
        return list(zip(nodes, ray.get(refs)))
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def disconnect(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
