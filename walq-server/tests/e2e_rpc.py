#!/usr/bin/env python3
"""End-to-end test of `walq serve`: request/reply over HTTP through kill -9.

Python 3, standard library only (tested with 3.11). It runs the real `walq`
binary:

    python3 walq-server/tests/e2e_rpc.py --walq target/release/walq
    WALQ_BIN=target/release/walq python3 walq-server/tests/e2e_rpc.py

What it does, all in this one process:

- starts `walq serve --data-dir <tmp> --listen 127.0.0.1:<free port>
  --admin-listen 127.0.0.1:<free port>` and waits for `/readyz` 200;
- creates the `requests` queue, its consumer group `workers` with
  `{"prefetch": 1}` (PUT, through the API), the `replies` queue and the
  client's named consumer on it;
- a client thread produces requests (durable: the queue's default, `sync`)
  with `Walq-Reply-To: replies` and `Walq-Correlation-Id: <id>`, at most
  `--window` of them awaiting a reply at a time, retrying a produce whose
  connection failed (at-least-once: the retry may duplicate the request);
- a worker thread fetches from the group (asking for 8: the group's prefetch
  of 1 must cap it), produces the reply to the `reply_to` queue with the
  same `Walq-Correlation-Id`, then acks;
- a reader thread long-polls the client's named consumer on `replies`,
  commits what it handled, and matches replies by correlation id;
- the main thread kills the server with SIGKILL `--kills` times and restarts
  it on the same directory and ports. The kills cycle through three moments:
  the worker holds a fetched request and has not replied; the worker has
  replied and not acked (so a duplicate reply is certain); the client has
  just had a 200 for a request ("between requests").

It fails (exit 1, with the reason and the server's log tail) unless, in the
end: every request the client had a 200 for is in the `requests` queue at
the offset it was told and has a reply with the right value; no reply
carries an unknown correlation id; every request a worker had fetched and
not acked (its ack never sent) when the server died was delivered again;
the group has nothing left unacked and no dead letters, and still has
prefetch 1 after the restarts; no fetch handed out more than one delivery;
and a final SIGTERM drains the server to exit code 0. Duplicated replies
(a redelivered request answered twice) are allowed and counted.

The last line on success:

    e2e_rpc: OK requests=200 kills=5 redeliveries=N duplicates=M ...

No server outlives the script: it is killed in a `finally`, on SIGTERM,
SIGINT or SIGHUP of this script, and (Linux) by PR_SET_PDEATHSIG if this
script dies by SIGKILL.
"""

import argparse
import collections
import ctypes
import http.client
import json
import os
import queue as queue_mod
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REQUESTS = "requests"
REPLIES = "replies"
GROUP = "workers"
CONSUMER = "client-1"
LONG_POLL_MS = 300
HTTP_TIMEOUT = 10.0


class Failure(Exception):
    """The test failed: the message says what was expected and what happened."""


class Unreachable(Exception):
    """The request got no answer (refused, reset, cut off): the server died or restarts."""


def log(msg):
    print(f"e2e_rpc: {msg}", flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig_setup():
    """preexec_fn: the server gets SIGKILL when the thread that started it (the
    main thread) ends, even if this script is killed with SIGKILL. Linux only;
    elsewhere the finally block and the signal handlers are the guard."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def setup():
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return setup


class Server:
    """One `walq serve` process at a time, on one data directory and two ports."""

    def __init__(self, walq, data_dir, log_path):
        self.walq = walq
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = None
        self.data_port = None
        self.admin_port = None
        self.starts = 0
        self._preexec = _pdeathsig_setup()
        self._lock = threading.Lock()

    def addr(self, admin=False):
        with self._lock:
            return ("127.0.0.1", self.admin_port if admin else self.data_port)

    def start(self, ready_timeout=20.0):
        """Starts the server and waits for /readyz 200; new ports if the old ones are taken."""
        for attempt in range(3):
            with self._lock:
                if self.data_port is None or attempt > 0:
                    self.data_port, self.admin_port = free_port(), free_port()
                data_port, admin_port = self.data_port, self.admin_port
            args = [
                self.walq, "serve",
                "--data-dir", self.data_dir,
                "--listen", f"127.0.0.1:{data_port}",
                "--admin-listen", f"127.0.0.1:{admin_port}",
                "--shutdown-grace-ms", "2000",
            ]
            with open(self.log_path, "ab") as out:
                out.write(f"---- start {self.starts + 1}: {' '.join(args)}\n".encode())
                out.flush()
                self.proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    preexec_fn=self._preexec,
                )
            self.starts += 1
            deadline = time.monotonic() + ready_timeout
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    if rc == 6 and attempt < 2:  # I/O error: most likely a port taken meanwhile
                        log(f"server exited with code 6 at start (address in use?); new ports")
                        break
                    raise Failure(f"the server exited with code {rc} while starting")
                try:
                    status, _ = call(self, "GET", "/readyz", admin=True, timeout=2.0)
                    if status == 200:
                        return
                except Unreachable:
                    pass
                if time.monotonic() > deadline:
                    raise Failure(f"/readyz did not answer 200 within {ready_timeout:.0f} s")
                time.sleep(0.01)
        raise Failure("the server could not start (ports taken three times?)")

    def kill9(self):
        """SIGKILL, and reap the process (its directory lock is then free)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def terminate(self, timeout):
        """SIGTERM (the drain); the exit code, or None if it did not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def ensure_dead(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(text[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def call(server, method, path, body=None, headers=None, admin=False, timeout=HTTP_TIMEOUT):
    """One request on a fresh connection: (status, JSON document or text)."""
    host, port = server.addr(admin)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = dict(headers or {}, **{"Content-Type": "application/json"})
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable(f"{method} {path}: {e!r}") from e
    finally:
        conn.close()
    if "json" in ctype and data:
        try:
            return resp.status, json.loads(data)
        except ValueError as e:
            raise Failure(f"{method} {path}: {resp.status} with a body that is not JSON: {data[:200]!r}") from e
    return resp.status, data.decode("utf-8", "replace")


def expect(status, doc, want, what):
    if status != want:
        raise Failure(f"{what}: expected HTTP {want}, got {status}: {doc}")
    return doc


def header(record, name):
    for n, v in record["headers"]:
        if n == name:
            return v
    return None


class Test:
    def __init__(self, args, server):
        self.args = args
        self.server = server
        self.n = args.requests
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.errors = []
        self.kill_requests = queue_mod.Queue()
        # The kill schedule: (request index, moment), in order; `fired` counts those done.
        moments = ["worker-fetched", "worker-replied", "between-requests"]
        self.schedule = [
            (self.n * (k + 1) // (args.kills + 1), moments[k % len(moments)]) for k in range(args.kills)
        ]
        self.fired = 0
        self.kills = []  # (moment, detail)
        # Client state.
        self.sent_ids = set()  # every correlation id the client tried to produce
        self.acked = {}  # correlation id -> offset, for the produces answered 200
        self.outstanding = set()  # acked, no reply yet
        self.produce_retries = 0
        # Worker state.
        self.fetch_count = collections.Counter()  # request offset -> deliveries seen
        self.fetches = 0
        self.redeliveries = 0
        self.max_delivery_count = 0
        self.must_redeliver = {}  # offset -> (fetches seen when abandoned, why)
        self.worker_interrupted = 0
        # Reader state.
        self.replies = collections.defaultdict(list)  # correlation id -> [(reply offset, value)]
        self.seen_reply_offsets = set()
        self.reader_next = 0
        self.reader_resumes = 0

    # ---- threads ----

    def run_thread(self, name, fn):
        def body():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported to the main thread
                detail = str(e) if isinstance(e, Failure) else traceback.format_exc()
                with self.lock:
                    self.errors.append(f"{name}: {detail}")
                self.stop.set()

        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t

    def check_stop(self):
        if self.stop.is_set():
            raise Failure("stopped (another thread failed)")

    def request_kill(self, moment, detail):
        """Asks the main thread to SIGKILL and restart the server; returns once it is ready again."""
        done = threading.Event()
        self.kill_requests.put((moment, detail, done))
        while not done.wait(0.1):
            self.check_stop()

    def next_kill(self):
        with self.lock:
            return self.schedule[self.fired] if self.fired < len(self.schedule) else None

    def client(self):
        for i in range(self.n):
            cid = f"rpc-{i:05d}"
            # Requests past a worker kill's index wait for it, so that every
            # scheduled kill happens while the client is still sending.
            deadline = time.monotonic() + 30
            while True:
                self.check_stop()
                k = self.next_kill()
                with self.cond:
                    room = len(self.outstanding) < self.args.window
                    if not room:
                        self.cond.wait(0.1)
                if room and not (k and k[1].startswith("worker") and k[0] < i):
                    break
                if time.monotonic() > deadline:
                    raise Failure(
                        f"request {cid}: no room for 30 s (awaiting replies: {sorted(self.outstanding)[:10]},"
                        f" next kill {k})"
                    )
                time.sleep(0.002)
            with self.lock:
                self.sent_ids.add(cid)
            headers = {"Walq-Reply-To": REPLIES, "Walq-Correlation-Id": cid}
            while True:
                self.check_stop()
                try:
                    status, doc = call(self.server, "POST", f"/v1/queues/{REQUESTS}/records",
                                       body=str(i).encode(), headers=headers)
                except Unreachable:
                    # No answer: the request may or may not be in the queue; the
                    # same id again (a duplicate is answered twice, never lost).
                    with self.lock:
                        self.produce_retries += 1
                    time.sleep(0.02)
                    continue
                expect(status, doc, 200, f"produce {cid}")
                if doc.get("durability") != "sync":
                    raise Failure(f"produce {cid}: durability {doc.get('durability')!r}, expected the default 'sync'")
                break
            with self.cond:
                self.acked[cid] = doc["offset"]
                if cid not in self.replies:
                    self.outstanding.add(cid)
            k = self.next_kill()
            if k and k[1] == "between-requests" and k[0] <= i:
                self.request_kill("between-requests", f"after the 200 for {cid}")

    def worker(self):
        path = f"/v1/queues/{REQUESTS}/groups/{GROUP}/fetch?max=8&wait_ms={LONG_POLL_MS}"
        while not self.stop.is_set():
            try:
                status, doc = call(self.server, "POST", path)
            except Unreachable:
                time.sleep(0.02)
                continue
            expect(status, doc, 200, "fetch")
            deliveries = doc["deliveries"]
            if len(deliveries) > 1:
                raise Failure(f"a fetch of max=8 handed out {len(deliveries)} deliveries; the group's prefetch is 1")
            for d in deliveries:
                self.handle(d)

    def handle(self, d):
        offset, cid, reply_to = d["offset"], header(d, "correlation_id"), header(d, "reply_to")
        if cid is None or reply_to is None:
            raise Failure(f"delivery at offset {offset} lacks reply_to or correlation_id: {d}")
        with self.lock:
            self.fetches += 1
            seen = self.fetch_count[offset]
            if seen:
                self.redeliveries += 1
            self.fetch_count[offset] += 1
            self.max_delivery_count = max(self.max_delivery_count, d["delivery_count"])
        moment = None
        k = self.next_kill()
        if k and k[1].startswith("worker") and not seen and int(d["value"]) >= k[0]:
            moment = k[1]
        if moment == "worker-fetched":
            self.abandon(offset, seen, f"{cid} fetched (delivery {d['id']}), not replied")
            self.request_kill(moment, f"the worker holds {cid} at offset {offset}, not replied")
            return
        reply = str(int(d["value"]) ** 2).encode()
        try:
            status, doc = call(self.server, "POST", f"/v1/queues/{reply_to}/records", body=reply,
                               headers={"Walq-Correlation-Id": cid})
        except Unreachable:
            # The server died before the ack was sent: the request must come back.
            self.abandon(offset, seen, f"{cid}: the reply's produce failed")
            return
        expect(status, doc, 200, f"reply to {cid}")
        if moment == "worker-replied":
            self.abandon(offset, seen, f"{cid} replied, not acked")
            self.request_kill(moment, f"the worker replied to {cid} at offset {offset}, not acked")
            return
        try:
            status, doc = call(self.server, "POST",
                               f"/v1/queues/{REQUESTS}/groups/{GROUP}/deliveries/{d['id']}/ack")
        except Unreachable:
            # The ack was sent and may have been applied: no redelivery is owed.
            with self.lock:
                self.worker_interrupted += 1
            return
        expect(status, doc, 200, f"ack of {cid} (delivery {d['id']})")

    def abandon(self, offset, seen, why):
        with self.lock:
            self.worker_interrupted += 1
            self.must_redeliver[offset] = (seen + 1, why)

    def reader(self):
        nxt = None  # None: from the consumer's committed position (as a restarted client)
        while not self.stop.is_set():
            path = f"/v1/queues/{REPLIES}/consumers/{CONSUMER}/records?max=100&wait_ms={LONG_POLL_MS}"
            if nxt is not None:
                path += f"&offset={nxt}"
            try:
                status, doc = call(self.server, "GET", path)
            except Unreachable:
                if nxt is not None:
                    with self.lock:
                        self.reader_resumes += 1
                nxt = None
                time.sleep(0.02)
                continue
            expect(status, doc, 200, "read replies")
            with self.cond:
                for r in doc["records"]:
                    if r["offset"] in self.seen_reply_offsets:
                        continue  # read again after a resume from the committed position
                    self.seen_reply_offsets.add(r["offset"])
                    cid = header(r, "correlation_id")
                    if cid not in self.sent_ids:
                        raise Failure(f"a reply carries a correlation id the client never sent: {r}")
                    self.replies[cid].append((r["offset"], r["value"]))
                    want = str(int(cid.split("-")[1]) ** 2)
                    if r["value"] != want:
                        raise Failure(f"the reply to {cid} is {r['value']!r}, expected {want!r}: {r}")
                    self.outstanding.discard(cid)
                self.reader_next = max(self.reader_next, doc["next_offset"])
                self.cond.notify_all()
            nxt = doc["next_offset"]
            if doc["records"]:
                try:
                    status, c = call(self.server, "POST", f"/v1/queues/{REPLIES}/consumers/{CONSUMER}/commit",
                                     body={"offset": nxt})
                except Unreachable:
                    continue
                expect(status, c, 200, "commit")
                if c["committed"] != nxt:
                    raise Failure(f"commit of {nxt} answered committed={c['committed']}")

    # ---- the main thread ----

    def setup(self):
        s = self.server
        expect(*call(s, "PUT", f"/v1/queues/{REQUESTS}"), 201, "create the requests queue")
        g = expect(*call(s, "PUT", f"/v1/queues/{REQUESTS}/groups/{GROUP}", body={"prefetch": 1}), 201,
                   "create the group")
        if g["options"].get("prefetch") != 1:
            raise Failure(f"the group was created without prefetch 1: {g}")
        expect(*call(s, "PUT", f"/v1/queues/{REPLIES}"), 201, "create the replies queue")
        expect(*call(s, "PUT", f"/v1/queues/{REPLIES}/consumers/{CONSUMER}", body={"start": "earliest"}), 201,
               "create the client's consumer")

    def serve_kills_until(self, done, what, timeout, missing=None):
        """Serves kill requests until done() or a failure; Failure after timeout,
        saying what is `missing()`."""
        deadline = time.monotonic() + timeout
        while not done():
            with self.lock:
                if self.errors:
                    raise Failure("; ".join(self.errors))
            if time.monotonic() > deadline:
                raise Failure(f"{what}: not done within {timeout:.0f} s" + (f": {missing()}" if missing else ""))
            try:
                moment, detail, ack = self.kill_requests.get(timeout=0.05)
            except queue_mod.Empty:
                continue
            self.server.kill9()
            with self.lock:
                self.kills.append((moment, detail))
                self.fired += 1
            log(f"kill -9 #{len(self.kills)} ({moment}): {detail}")
            self.server.start()
            ack.set()

    def group_state(self):
        return expect(*call(self.server, "GET", f"/v1/queues/{REQUESTS}/groups/{GROUP}"), 200, "group info")

    def run(self):
        started = time.monotonic()
        self.server.start()
        self.setup()
        threads = [self.run_thread("worker", self.worker), self.run_thread("reader", self.reader)]
        client = self.run_thread("client", self.client)
        budget = self.args.timeout
        remaining = lambda: max(1.0, budget - (time.monotonic() - started))  # noqa: E731
        self.serve_kills_until(lambda: not client.is_alive(), "the client's requests", remaining())
        with self.lock:
            if self.errors:
                raise Failure("; ".join(self.errors))
        if len(self.kills) != len(self.schedule):
            raise Failure(f"only {len(self.kills)} of {len(self.schedule)} kills happened")

        def settled():
            with self.lock:
                if self.outstanding or any(self.fetch_count[o] < n for o, (n, _) in self.must_redeliver.items()):
                    return False
            g = self.group_state()
            return g["unacked"] == 0 and g["pending"] == 0 and g["waiting_redelivery"] == 0

        def unsettled():
            with self.lock:
                owed = {o: why for o, (n, why) in self.must_redeliver.items() if self.fetch_count[o] < n}
                waiting = sorted(self.outstanding)
            return (f"{len(waiting)} requests without a reply {waiting[:10]}; not delivered again: {owed};"
                    f" group state {self.group_state()}")

        self.serve_kills_until(settled, "every reply and every redelivery", remaining(), unsettled)
        # Every request is acked: no reply is produced any more. Read to the end.
        end = expect(*call(self.server, "GET", f"/v1/queues/{REPLIES}"), 200, "replies queue info")["next_offset"]

        def read_all():
            with self.lock:
                return self.reader_next >= end

        self.serve_kills_until(read_all, f"reading the replies up to offset {end}", remaining())
        self.stop.set()
        for t in threads + [client]:
            t.join(HTTP_TIMEOUT + 2)
        self.verify(end)
        rc = self.server.terminate(timeout=15)
        if rc != 0:
            raise Failure(f"SIGTERM: the server exited with {rc}, expected 0 (drained and closed)")
        elapsed = time.monotonic() - started
        duplicates = sum(len(v) - 1 for v in self.replies.values())
        log(
            f"OK requests={self.n} kills={len(self.kills)} redeliveries={self.redeliveries}"
            f" owed_redeliveries={len(self.must_redeliver)} duplicates={duplicates}"
            f" produce_retries={self.produce_retries} reader_resumes={self.reader_resumes}"
            f" max_delivery_count={self.max_delivery_count} replies={end} elapsed={elapsed:.1f}s"
        )

    def verify(self, replies_end):
        problems = []
        # Every acknowledged produce is in the queue at the offset it was given.
        got = {}
        offset = 0
        while True:
            doc = expect(*call(self.server, "GET", f"/v1/queues/{REQUESTS}/records?offset={offset}&max=1000"),
                         200, "read the requests")
            for r in doc["records"]:
                got[r["offset"]] = header(r, "correlation_id")
            if not doc["records"]:
                break
            offset = doc["next_offset"]
        for cid, off in sorted(self.acked.items()):
            if got.get(off) != cid:
                problems.append(f"{cid} was acknowledged at offset {off}, which holds {got.get(off)!r}")
        if len(self.acked) != self.n:
            problems.append(f"{len(self.acked)} requests acknowledged, {self.n} sent")
        missing = [cid for cid in self.acked if cid not in self.replies]
        if missing:
            problems.append(f"{len(missing)} acknowledged requests have no reply: {missing[:10]}")
        never = {o: why for o, (n, why) in self.must_redeliver.items() if self.fetch_count[o] < n}
        if never:
            problems.append(f"fetched, not acked when the server died, never delivered again: {never}")
        if len(self.seen_reply_offsets) != replies_end:
            problems.append(f"read {len(self.seen_reply_offsets)} distinct replies, the queue holds {replies_end}")
        g = self.group_state()
        if g.get("options", {}).get("prefetch") != 1:
            problems.append(f"after the restarts the group's prefetch is not 1: {g.get('options')}")
        if g["ack_floor"] != len(got) or g["unacked"] != 0:
            problems.append(f"the group is not done: ack_floor {g['ack_floor']} of {len(got)}, {g['unacked']} unacked")
        if g.get("dead_letters"):
            problems.append(f"{g['dead_letters']} dead letters")
        c = expect(*call(self.server, "GET", f"/v1/queues/{REPLIES}/consumers/{CONSUMER}"), 200, "consumer info")
        if c["committed"] != replies_end or c["lag"] != 0:
            problems.append(f"the client's consumer committed {c['committed']} (lag {c['lag']}), the end is {replies_end}")
        if problems:
            raise Failure("\n  - " + "\n  - ".join(problems))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--walq", default=os.environ.get("WALQ_BIN"), help="the walq binary (or $WALQ_BIN)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--window", type=int, default=4, help="most requests awaiting a reply at once")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds for the whole run")
    p.add_argument("--keep", action="store_true", help="keep the data directory and server log")
    args = p.parse_args()
    if not args.walq:
        p.error("give the walq binary: --walq PATH or WALQ_BIN=PATH")
    if not (os.path.isfile(args.walq) and os.access(args.walq, os.X_OK)):
        p.error(f"{args.walq}: not an executable file")
    if args.requests < 1 or args.kills < 0 or args.kills >= args.requests or args.window < 1:
        p.error("need requests >= 1, 0 <= kills < requests, window >= 1")

    def on_signal(signum, _frame):
        raise Failure(f"interrupted by signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tmp = tempfile.mkdtemp(prefix="walq-e2e-rpc-")
    server = Server(os.path.abspath(args.walq), os.path.join(tmp, "data"), os.path.join(tmp, "server.log"))
    test = Test(args, server)
    ok = False
    try:
        test.run()
        ok = True
    except (Failure, Unreachable) as e:
        print(f"e2e_rpc: FAIL: {e}", file=sys.stderr)
        print(f"e2e_rpc: kills so far: {test.kills}", file=sys.stderr)
        print(f"e2e_rpc: server log ({server.log_path}), last lines:\n{server.log_tail()}", file=sys.stderr)
    finally:
        test.stop.set()
        server.ensure_dead()
        if args.keep or not ok:
            print(f"e2e_rpc: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
