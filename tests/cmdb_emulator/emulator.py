#!/usr/bin/env python3
"""Emulator of BlueKing CMDB's resource watch API (bk-cmdb v3.10+ behaviour).

Behaviour follows /work/shared/CMDB-WATCH.md ("the doc"; section numbers below refer to it), which
summarises bk-cmdb's own docs and code (event_server watch.go, cacheservice service/cache.go
`watchEvent`/`generateWatchEventResp`, cacheservice event/watch/{watch,client}.go, common/watch).
Standard library only.  See README.md next to this file for the CLI and the control interface.
"""
import argparse
import base64
import bisect
import json
import re
import os
import signal
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

# Cursor type numbers: bk-cmdb src/common/watch/cursor.go `cursorTypeIntMap` (master).  7 was
# set_template (dropped in v3.10.1); kube_* (17-21) are not emulated.
CURSOR_TYPES = {
    "host": 2, "host_relation": 3, "biz": 4, "set": 5, "module": 6, "object_instance": 8,
    "process": 9, "process_instance_relation": 10, "host_identifier": 11, "mainline_instance": 12,
    "inst_asst": 13, "biz_set": 14, "biz_set_relation": 15, "plat": 16, "project": 22,
}
# §3 mode 2.  The value the doc/brief gives.  NOTE: bk-cmdb >= v3.10 computes NoEventCursor with
# Cursor.Encode(), which always appends "\r<uniq>", so on the wire it is WIRE_NO_EVENT_CURSOR and the
# server compares by string equality.  Selectable with --no-event-cursor.
DOC_NO_EVENT_CURSOR = "MQ0xDTVlYTZkM2YzOTRjMWY1ZDk4NmU5YmQ4Ng1ub0V2ZW50DTENMQ=="
WIRE_NO_EVENT_CURSOR = "MQ0xDTVlYTZkM2YzOTRjMWY1ZDk4NmU5YmQ4Ng1ub0V2ZW50DTENMQ0="
EVENT_TYPES = ("create", "update", "delete")
OPER = {"create": "insert", "update": "update", "delete": "delete"}  # §3 cursor <oper>
FIELDS_REQUIRED = {"host", "biz", "set", "module"}                   # §2 bk_fields
SUB_RESOURCE_OK = {"object_instance", "mainline_instance"}           # §2 bk_filter (documented set)
UNIQ_KEY_RES = {"object_instance", "mainline_instance", "inst_asst"}  # §3 cursor <uniq>
NO_PROJECTION = {"biz_set_relation", "host_identifier"}               # §2 bk_fields ignored
# bk-cmdb resources/errors/{common/default,english/en} (§2, C6): (Chinese default, English)
MESSAGES = {
    1199000: ("反序列化JSON数据失败", "Deserializing JSON data failed"),
    1199006: ("'bk_start_from' 数据参数校验不通过", "'bk_start_from' data parameter verification does not pass"),
    1199027: ("[%s]授权信息查询失败", "'%s' authorization information query failed"),
    1103007: ("事件节点不存在", "Event chain node not exist"),
}
DIRECT_PREFIX = "/api/v3/event/watch/resource/"
ESB_PATHS = ("/api/c/compapi/v2/cc/resource_watch/", "/api/c/compapi/v2/cc/resource_watch")
# D2: the API gateway's resource_watch, {apigw}/api/bk-cmdb/{stage}/api/v3/event/watch/resource/{bk_resource}
APIGW_PATH = re.compile(r"^/api/bk-cmdb/[^/]+/api/v3/event/watch/resource/([^/]+)$")


class WatchError(Exception):
    """A cmdb error answer. `sleep`: cmdb sleeps 500 ms before decode/validation errors (§2)."""

    def __init__(self, code, msg, sleep=False):
        super().__init__(msg)
        self.code, self.msg, self.sleep = code, msg, sleep


def cc_msg(code, lang, *args):
    text = MESSAGES[code][1 if lang == "en" else 0]
    return text % args if args else text


def encode_cursor(type_int, oid, oper, t_ns, uniq):
    # §3 cursor format, as bk-cmdb Cursor.Encode writes it: the "\r<uniq>" part is always present
    # (empty uniq for resources without a unique key).
    raw = "1\r%d\r%s\r%s\r%d\r%d\r%s" % (type_int, oid, oper, t_ns // 1_000_000_000, t_ns % 1_000_000_000, uniq)
    return base64.b64encode(raw.encode()).decode()


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def lookup_path(doc, path):
    """gjson-like dotted path lookup used by cmdb's CutJsonDataWithFields; returns (found, value)."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


class Node:
    __slots__ = ("seq", "t", "etype", "detail", "cursor", "sub", "dj", "proj")

    def __init__(self, seq, t, etype, detail, cursor, sub):
        self.seq, self.t, self.etype, self.detail, self.cursor, self.sub = seq, t, etype, detail, cursor, sub
        self.dj = None    # cached JSON of the full detail
        self.proj = None  # cached (fields tuple, projected JSON)


class Chain:
    """One resource's event chain. Nodes have absolute sequence numbers (1, 2, ...); `start` is the
    seq of the first unexpired node; nodes before it are invisible and are compacted away lazily."""

    def __init__(self, name):
        self.name, self.type_int = name, CURSOR_TYPES[name]
        self.nodes, self.times = [], []   # times: node time in ns, for bisect (TTL and start_from)
        self.base = self.start = 1        # seq of nodes[0] / of the first live node
        self.index = {}                   # cursor -> seq
        self.last_cursor, self.last_seq, self.last_t = None, 0, 0  # "last cursor" watch token (§3)
        self.cond = threading.Condition()

    def end(self):
        return self.base + len(self.nodes)

    def node(self, seq):
        return self.nodes[seq - self.base]

    def append(self, node):
        self.nodes.append(node)
        self.times.append(node.t)
        self.index[node.cursor] = node.seq
        self.last_cursor, self.last_seq, self.last_t = node.cursor, node.seq, node.t

    def prune(self, ttl_ns):
        # §4/§3 retention: only nodes younger than the TTL are visible (cmdb: cluster time >= now-TTL).
        i = bisect.bisect_left(self.times, time.time_ns() - ttl_ns, self.start - self.base)
        self.start = max(self.start, self.base + i)
        self.compact()

    def expire_upto(self, seq):
        before = self.start
        self.start = max(self.start, min(seq + 1, self.end()))
        self.compact()
        return self.start - before

    def compact(self):
        k = self.start - self.base
        if k and (k >= 4096 or k * 2 >= len(self.nodes)):
            for nd in self.nodes[:k]:
                self.index.pop(nd.cursor, None)
            del self.nodes[:k]
            del self.times[:k]
            self.base = self.start

    def live(self):
        return self.start < self.end()

    def earliest(self):
        return self.node(self.start)

    def latest(self):
        return self.nodes[-1]

    def lookup(self, cursor):
        """§3 cursor lookup: among unexpired nodes, else the last-cursor token, else None."""
        seq = self.index.get(cursor)
        if seq is not None and seq >= self.start:
            return seq
        if cursor == self.last_cursor:
            return self.last_seq
        return None

    def scan(self, after, limit, match):
        """Matching nodes with seq > after, at most `limit`; also returns the last seq scanned."""
        i = max(after + 1, self.start) - self.base
        if match is None:
            out = self.nodes[i:i + limit]
            return out, self.base + i + len(out) - 1
        out, n = [], len(self.nodes)
        while i < n and len(out) < limit:
            nd = self.nodes[i]
            if match(nd):
                out.append(nd)
            i += 1
        return out, self.base + i - 1


def make_matcher(types, sub):
    """bk_event_types and bk_filter.bk_sub_resource filters (isNodeHitEventType/SubResource)."""
    if not types and not sub:
        return None
    types = set(types or EVENT_TYPES)
    return lambda nd: nd.etype in types and (not sub or nd.sub == sub)


class Store:
    """All chains, the oid counter and the --state journal."""

    def __init__(self, args):
        self.ttl_ns = args.ttl_seconds * 1_000_000_000
        self.ttl = args.ttl_seconds
        self.long_poll = args.long_poll_seconds
        self.page = args.page_size
        self.no_event = args.no_event_cursor
        self.chains = {name: Chain(name) for name in CURSOR_TYPES}
        self.emit_lock = threading.Lock()  # oid counter + journal; taken before a chain's lock
        self.counter = 0
        self.journal = None
        if args.state:
            self.replay(args.state)
            self.journal = open(args.state, "a", encoding="utf-8")

    # ---- persistence -------------------------------------------------------------------------------
    def replay(self, path):
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # torn last line of a killed emulator
                chain = self.chains.get(rec.get("r"))
                if chain is None:
                    continue
                if rec.get("k") == "ev":
                    d = rec["d"]
                    chain.append(Node(chain.end(), rec["n"], rec["t"], d, rec["c"], self.sub_of(chain.name, d)))
                    self.counter = max(self.counter, rec["q"])
                elif rec.get("k") == "exp":
                    chain.expire_upto(rec["upto"])

    def write(self, lines):
        if self.journal is not None and lines:
            self.journal.write("".join(lines))
            self.journal.flush()

    @staticmethod
    def sub_of(res, detail):
        # sub resource of object/mainline instances = bk_obj_id (§2 bk_filter)
        return detail.get("bk_obj_id") if res in SUB_RESOURCE_OK else None

    # ---- control -----------------------------------------------------------------------------------
    def emit(self, res, events):
        chain = self.chains[res]
        cursors, lines = [], []
        with self.emit_lock, chain.cond:
            for ev in events:
                etype, detail = ev["type"], ev["detail"]
                t = max(time.time_ns(), chain.last_t + 1)  # strictly increasing per chain
                self.counter += 1
                oid = "%08x%016x" % (t // 1_000_000_000 & 0xFFFFFFFF, self.counter)
                # uniq = instance id (inst_asst: the association's own id), §3 cursor format
                uniq = str(detail.get("id" if res == "inst_asst" else "bk_inst_id", "")) if res in UNIQ_KEY_RES else ""
                cursor = encode_cursor(chain.type_int, oid, OPER[etype], t, uniq)
                nd = Node(chain.end(), t, etype, detail, cursor, self.sub_of(res, detail))
                nd.dj = dumps(detail)
                chain.append(nd)
                cursors.append(cursor)
                lines.append('{"k":"ev","r":"%s","q":%d,"n":%d,"t":"%s","c":"%s","d":%s}\n'
                             % (res, self.counter, t, etype, cursor, nd.dj))
            self.write(lines)  # journaled before the control call answers
            chain.cond.notify_all()  # wake long pollers
        return cursors

    def expire(self, res):
        dropped, lines = 0, []
        with self.emit_lock:
            for chain in ([self.chains[res]] if res else self.chains.values()):
                with chain.cond:
                    chain.prune(self.ttl_ns)
                    upto = chain.end() - 1
                    dropped += chain.expire_upto(upto)  # last-cursor token is kept (§3)
                    lines.append('{"k":"exp","r":"%s","upto":%d}\n' % (chain.name, upto))
            self.write(lines)
        return dropped

    def chain_dump(self, res):
        chain = self.chains[res]
        with chain.cond:
            chain.prune(self.ttl_ns)
            nodes = chain.nodes[chain.start - chain.base:]
        return [{"cursor": n.cursor, "type": n.etype, "detail": n.detail} for n in nodes]

    # ---- watch -------------------------------------------------------------------------------------
    def watch(self, res, opts, lang):
        """Runs one validated watch; returns (data JSON text, number of real events)."""
        chain = self.chains[res]
        fields = tuple(opts["fields"]) if opts["fields"] and res not in NO_PROJECTION else None
        match = make_matcher(opts["types"], opts["sub"])
        hit = match or (lambda nd: True)
        if opts["cursor"]:
            nodes, placeholder = self.watch_cursor(chain, opts["cursor"], match)
        elif opts["start_from"]:
            nodes, placeholder = self.watch_start_from(chain, opts["start_from"], match, hit, lang)
        else:
            nodes, placeholder = self.watch_from_now(chain, hit)
        if placeholder is not None:
            # bk_watched=false: exactly one placeholder event (generateWatchEventResp)
            ph = '{"bk_cursor":%s,"bk_resource":"%s","bk_event_type":"","bk_detail":null}' % (dumps(placeholder), res)
            return '{"bk_watched":false,"bk_events":[%s]}' % ph, 0
        parts = [self.render(res, nd, fields) for nd in nodes]
        return '{"bk_watched":true,"bk_events":[%s]}' % ",".join(parts), len(parts)

    def watch_from_now(self, chain, hit):
        # §3 mode 4 "from now": no long poll; latest event if it matches, else the no-event cursor.
        with chain.cond:
            chain.prune(self.ttl_ns)
            if chain.live() and hit(chain.latest()):
                return [chain.latest()], None
        return None, self.no_event

    def watch_start_from(self, chain, start, match, hit, lang):
        # §3 mode 3 bk_start_from: no long poll; range check against the TTL (no 500 ms sleep).
        diff = int(time.time()) - start
        if diff < 0 or diff > self.ttl:
            raise WatchError(1199006, cc_msg(1199006, lang))
        with chain.cond:
            chain.prune(self.ttl_ns)
            if not chain.live():
                return None, self.no_event                 # empty chain -> no-event placeholder
            tail = chain.latest()
            if tail.t // 1_000_000_000 <= start:           # latest second <= start -> "from now"
                return ([tail], None) if hit(tail) else (None, self.no_event)
            # first node with cluster time > start, then up to page_size more (page+1 quirk)
            i = bisect.bisect_right(chain.times, start * 1_000_000_000, chain.start - chain.base)
            first = chain.nodes[i]
            rest, _ = chain.scan(first.seq, self.page, match)
            nodes = ([first] if hit(first) else []) + rest
            if not nodes:
                return None, tail.cursor                   # none matching -> latest cursor
            return nodes, None

    def watch_cursor(self, chain, cursor, match):
        # §3 mode 1 (cursor, long poll) and mode 2 (no-event cursor).
        deadline = time.monotonic() + self.long_poll
        with chain.cond:
            chain.prune(self.ttl_ns)
            if cursor == self.no_event:
                if chain.live():
                    # start from the earliest unexpired event, itself included (page+1 quirk)
                    first = chain.earliest()
                    after = first.seq
                    if match is None or match(first):
                        rest, _ = chain.scan(after, self.page, match)
                        return [first] + rest, None
                else:
                    after = chain.last_seq  # empty chain: wait for events after the last token
            else:
                after = chain.lookup(cursor)
                if after is None:  # 1103007, answered at once (no sleep: err is shadowed in cmdb)
                    raise WatchError(1103007, None)
            scanned = after
            while True:
                nodes, scanned = chain.scan(scanned, self.page, match)
                if nodes:
                    return nodes, None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                chain.cond.wait(remaining)
                chain.prune(self.ttl_ns)
            # timed out: empty chain -> echo the caller's cursor; otherwise the latest node's
            # cursor (skipping past non-matching events), watched=false
            if not chain.live():
                return None, cursor
            return None, chain.latest().cursor

    def render(self, res, nd, fields):
        if fields is None:
            dj = nd.dj
            if dj is None:
                dj = nd.dj = dumps(nd.detail)
        else:
            cached = nd.proj
            if cached is not None and cached[0] == fields:
                dj = cached[1]
            else:
                # §2 projection: exactly the listed keys, missing ones as null (CutJsonDataWithFields)
                items = []
                for f in fields:
                    found, val = lookup_path(nd.detail, f)
                    items.append("%s:%s" % (dumps(f), dumps(val) if found else "null"))
                dj = "{" + ",".join(items) + "}"
                nd.proj = (fields, dj)
        return '{"bk_cursor":"%s","bk_resource":"%s","bk_event_type":"%s","bk_detail":%s}' % (
            nd.cursor, res, nd.etype, dj)


def parse_options(body, lang):
    """Decodes and validates a watch body like WatchEventOptions + Validate (§2).
    Returns a dict; raises WatchError (1199000 / 1199998, both after a 500 ms sleep)."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)

    def typed(key, kind, default):
        v = obj.get(key)
        if v is None:
            return default
        if kind == "strlist":
            if not isinstance(v, list) or any(x is not None and not isinstance(x, str) for x in v):
                raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)
            return [x or "" for x in v]  # Go: null element -> ""
        if kind == "int64":
            if isinstance(v, bool) or not isinstance(v, int) or not -2**63 <= v < 2**63:
                raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)
            return v
        if kind == "obj":
            if not isinstance(v, dict):
                raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)
            return v
        if not isinstance(v, str):
            raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)
        return v

    opts = {"types": typed("bk_event_types", "strlist", []), "fields": typed("bk_fields", "strlist", []),
            "start_from": typed("bk_start_from", "int64", 0), "cursor": typed("bk_cursor", "str", ""),
            "resource": typed("bk_resource", "str", "")}
    filt = typed("bk_filter", "obj", {})
    sub = filt.get("bk_sub_resource")
    if sub is not None and not isinstance(sub, str):
        raise WatchError(1199000, cc_msg(1199000, lang), sleep=True)
    opts["sub"] = sub or ""
    return opts


def validate(opts):
    """WatchEventOptions.Validate order, then the resource lookup; plain errors -> 1199998 (§2)."""
    def bad(msg):
        raise WatchError(1199998, msg, sleep=True)
    for t in opts["types"]:
        if t not in EVENT_TYPES:
            bad("unsupported event type")
    res = opts["resource"]
    if res in FIELDS_REQUIRED and not opts["fields"]:
        bad("%s event must have fields" % res)
    if opts["start_from"] != 0 and opts["cursor"]:
        bad("bk_start_from and bk_cursor can not use at the same time")
    if opts["sub"] and res not in SUB_RESOURCE_OK:
        bad("%s event cannot have sub resource" % res)
    if res not in CURSOR_TYPES:
        bad("unsupported cursor type %s" % res)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.direct = self.esb = self.apigw = self.auth_refused = self.events = self.pages = self.outage = 0
        self.errors = {}

    def error(self, code, auth=False):
        with self.lock:
            self.errors[str(code)] = self.errors.get(str(code), 0) + 1
            self.auth_refused += auth

    def snapshot(self):
        with self.lock:
            return {"requests": {"direct": self.direct, "esb": self.esb, "apigw": self.apigw},
                    "auth_refused": self.auth_refused,
                    "errors": dict(self.errors), "events_answered": self.events, "pages": self.pages,
                    "outage_answers": self.outage}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "cmdb-emulator/1"
    disable_nagle_algorithm = True

    # ---- plumbing ----------------------------------------------------------------------------------
    def log_request(self, code="-", size="-"):
        sys.stderr.write("%s %s %s\n" % (self.command, self.path, getattr(code, "value", code)))

    def log_message(self, fmt, *args):
        sys.stderr.write("emulator: " + (fmt % args) + "\n")

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send(self, status, body, ctype="application/json"):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        # headers and body in one write (no Nagle/delayed-ACK stall on keep-alive connections)
        self._headers_buffer.append(b"\r\n" + (data if self.command != "HEAD" else b""))
        self.flush_headers()

    def send_json(self, status, obj):
        self.send(status, dumps(obj))

    def do_POST(self):
        self.route()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def route(self):
        path = self.path.split("?", 1)[0]
        if path.startswith(DIRECT_PREFIX) and "/" not in path[len(DIRECT_PREFIX):] and len(path) > len(DIRECT_PREFIX):
            return self.bk_endpoint("direct", unquote(path[len(DIRECT_PREFIX):]))
        if path in ESB_PATHS:
            return self.bk_endpoint("esb", None)
        gateway = APIGW_PATH.match(path)
        if gateway:
            return self.bk_endpoint("apigw", unquote(gateway.group(1)))
        if path.startswith("/emulator/"):
            return self.control(path[len("/emulator/"):])
        self.read_body()
        self.send(404, "404 page not found\n", "text/plain")

    # ---- bk-cmdb endpoints -------------------------------------------------------------------------
    def lang(self):
        v = self.headers.get("X-Bkcmdb-Language") or self.headers.get("HTTP_BLUEKING_LANGUAGE") or ""
        return "en" if v.strip().lower() == "en" else "default"

    def bk_endpoint(self, kind, resource):
        srv = self.server
        body = self.read_body()
        with srv.stats.lock:
            setattr(srv.stats, kind, getattr(srv.stats, kind) + 1)
        status = srv.outage_status()
        if status:  # a gateway in front of a down cmdb: bare HTTP status, plain text
            with srv.stats.lock:
                srv.stats.outage += 1
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
            return self.send(status, "%d %s\n" % (status, phrase), "text/plain")
        if self.command != "POST":  # §1: only POST
            return self.send(405, "405 method not allowed\n", "text/plain")
        if kind == "direct":
            return self.direct(resource, body)
        if kind == "apigw":
            return self.apigw(resource, body)
        return self.esb(body)

    def direct(self, resource, body):
        lang, stats = self.lang(), self.server.stats
        # §1 header check (rdapi checkHTTPAuth): supplier first, then user; HTTP 500.
        h = self.headers
        supplier = (h.get("X-Bkcmdb-Supplier-Account") or h.get("X-Bkapi-Supplier-Account")
                    or h.get("HTTP_BK_SUPPLIER_ACCOUNT") or h.get("HTTP_BLUEKING_SUPPLIER_ID"))
        user = h.get("X-Bkcmdb-User") or h.get("BK_User")
        if not supplier or not user:
            msg = cc_msg(1199027, lang, "owner_id" if not supplier else "user")
            stats.error(1199027, auth=True)
            return self.send_json(500, {"result": False, "bk_error_code": 1199027, "bk_error_msg": msg,
                                        "permission": None, "data": None})
        try:
            data = self.run_watch(body, resource, lang)
        except WatchError as e:
            return self.send_json(200, {"result": False, "bk_error_code": e.code, "bk_error_msg": e.msg,
                                        "permission": None, "data": None})
        # §3: direct success written verbatim (RespString)
        self.send(200, '{"result": true, "bk_error_code": 0, "bk_error_msg": "success", "data": %s}' % data)

    def esb(self, body):
        stats, rid = self.server.stats, uuid.uuid4().hex
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        obj = obj if isinstance(obj, dict) else {}
        try:
            auth = json.loads(self.headers.get("X-Bkapi-Authorization") or "{}")
        except ValueError:
            auth = {}
        auth = auth if isinstance(auth, dict) else {}

        def cred(k):
            v = auth.get(k) or obj.get(k)
            return v if isinstance(v, str) else ""
        code, secret, user = cred("bk_app_code"), cred("bk_app_secret"), cred("bk_username")

        def esb_fail(errcode, msg, auth_err=True):
            stats.error(errcode, auth=auth_err)
            self.send_json(200, {"result": False, "code": errcode, "data": None, "message": msg, "request_id": rid})
        # §1 ESB app auth (legacy-bk-paas esb/bkapp/validators.py AppSecretValidator), HTTP 200
        if not code:
            return esb_fail(1306000, "APP Code [bk_app_code] cannot be empty")
        if not secret:
            return esb_fail(1306000, "Signature [bk_signature] and APP Secret [bk_app_secret] cannot be empty at the same time")
        apps = self.server.apps
        if code not in apps:
            return esb_fail(1306000, "Invalid APP Code [bk_app_code=%s], please confirm if the APP Code has been registered" % code)
        if apps[code] != secret:
            return esb_fail(1306000, "APP Secret verification failed, pelase confirm if the APP Secret and APP Code [bk_app_code=%s] match" % code)
        if not user and not cred("bk_token"):  # own wording: ESB user verification
            return esb_fail(1306000, "User authentication failed, please provide a valid user identity, such as bk_username, bk_token")
        resource = obj.get("bk_resource")
        if not isinstance(resource, str) or not resource:  # dest_path .../resource/{bk_resource}
            return esb_fail(1306407, "The component's destination request path cannot be formatted", auth_err=False)
        # ESB passes the caller's language to cmdb (HTTP_BLUEKING_LANGUAGE)
        try:
            data = self.run_watch(body, resource, self.lang())
        except WatchError as e:
            return self.send_json(200, {"result": False, "code": e.code, "message": e.msg, "data": None,
                                        "permission": None, "request_id": rid})
        # ESB envelope: {result, code, message, data, permission, request_id}, always HTTP 200
        self.send(200, '{"result":true,"code":0,"message":"success","data":%s,"permission":null,"request_id":"%s"}'
                  % (data, rid))

    def apigw(self, resource, body):
        """The API gateway (D2, E2): app credentials in the X-Bkapi-Authorization header only
        (allow_auth_from_params: false); wrong ones are HTTP 400 / 1640001. The gateway then calls
        cmdb with X-Bkcmdb-Supplier-Account: 0 and the app's user, and passes cmdb's answer on
        with bk_error_code/bk_error_msg renamed to code/message (C4 parseResponse)."""
        stats = self.server.stats
        try:
            auth = json.loads(self.headers.get("X-Bkapi-Authorization") or "{}")
        except ValueError:
            auth = {}
        auth = auth if isinstance(auth, dict) else {}
        code, secret = auth.get("bk_app_code"), auth.get("bk_app_secret")
        if not isinstance(code, str) or self.server.apps.get(code) != secret:
            stats.error(1640001, auth=True)
            return self.send_json(400, {"code": 1640001, "code_name": "INVALID_ARGS", "data": None, "result": False,
                                        "message": 'Parameters error [reason="bk_app_code or bk_app_secret is incorrect"]'})
        try:
            data = self.run_watch(body, resource, self.lang())
        except WatchError as e:
            return self.send_json(200, {"result": False, "code": e.code, "message": e.msg, "data": None,
                                        "permission": None})
        self.send(200, '{"result":true,"code":0,"message":"success","data":%s}' % data)

    def run_watch(self, body, resource, lang):
        srv = self.server
        try:
            opts = parse_options(body, lang)
            opts["resource"] = resource  # §1: the resource in the path wins over the body
            validate(opts)
            data, n = srv.store.watch(resource, opts, lang)
        except WatchError as e:
            if e.code == 1103007:
                e.msg = cc_msg(1103007, lang)
            srv.stats.error(e.code)
            if e.sleep:
                time.sleep(0.5)  # §2: cmdb's deferred sleep on decode/validation errors
            raise
        with srv.stats.lock:
            srv.stats.pages += 1
            srv.stats.events += n
        return data

    # ---- control interface ------------------------------------------------------------------------
    def control(self, sub):
        srv, body = self.server, self.read_body()
        routes = {"events": "POST", "expire": "POST", "outage": "POST", "stats": "GET", "health": "GET"}
        name = "chain" if sub.startswith("chain/") else sub
        if name not in routes and name != "chain":
            return self.send_json(404, {"error": "unknown control endpoint"})
        if self.command != routes.get(name, "GET"):
            return self.send_json(405, {"error": "method not allowed"})
        try:
            req = json.loads(body) if body.strip() else {}
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
            if name == "events":
                res, events = req.get("resource"), req.get("events")
                if res not in CURSOR_TYPES:
                    raise ValueError("unknown resource %r" % (res,))
                if not isinstance(events, list) or not all(
                        isinstance(e, dict) and e.get("type") in EVENT_TYPES and isinstance(e.get("detail"), dict)
                        for e in events):
                    raise ValueError("events must be [{type: create|update|delete, detail: {...}}]")
                return self.send_json(200, {"cursors": srv.store.emit(res, events)})
            if name == "expire":
                res = req.get("resource")
                if res is not None and res not in CURSOR_TYPES:
                    raise ValueError("unknown resource %r" % (res,))
                return self.send_json(200, {"dropped": srv.store.expire(res)})
            if name == "outage":
                seconds, status = float(req.get("seconds", 0)), int(req.get("status", 503))
                with srv.outage_lock:
                    srv.outage = (status, time.monotonic() + seconds) if seconds > 0 else None
                return self.send_json(200, {"status": status, "seconds": seconds})
            if name == "stats":
                return self.send_json(200, srv.stats.snapshot())
            if name == "health":
                return self.send_json(200, {"ok": True})
            res = unquote(sub[len("chain/"):])
            if res not in CURSOR_TYPES:
                return self.send_json(404, {"error": "unknown resource %r" % res})
            return self.send_json(200, {"nodes": srv.store.chain_dump(res)})
        except (ValueError, TypeError) as e:
            return self.send_json(400, {"error": str(e)})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def outage_status(self):
        with self.outage_lock:
            if self.outage and time.monotonic() < self.outage[1]:
                return self.outage[0]
            self.outage = None
            return 0


def main():
    p = argparse.ArgumentParser(description="BlueKing CMDB resource watch emulator")
    p.add_argument("--port-file", required=True, help="the bound port is written here once listening")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--state", help="JSON-lines journal; replayed on start")
    p.add_argument("--ttl-seconds", type=int, default=10800)
    p.add_argument("--long-poll-seconds", type=float, default=20)
    p.add_argument("--page-size", type=int, default=200)
    p.add_argument("--app", action="append", default=[], metavar="CODE:SECRET", help="ESB app credentials")
    p.add_argument("--no-event-cursor", default=DOC_NO_EVENT_CURSOR,
                   help="no-event cursor value; 'wire' = the value bk-cmdb >= v3.10 really sends")
    args = p.parse_args()
    if args.no_event_cursor == "wire":
        args.no_event_cursor = WIRE_NO_EVENT_CURSOR
    apps = {}
    for a in args.app:
        code, sep, secret = a.partition(":")
        if not sep:
            p.error("--app must be CODE:SECRET")
        apps[code] = secret

    server = Server((args.host, args.port), Handler)
    server.store, server.stats, server.apps = Store(args), Stats(), apps
    server.outage, server.outage_lock = None, threading.Lock()

    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.replace(tmp, args.port_file)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write("cmdb emulator listening on %s:%d\n" % server.server_address[:2])
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    if server.store.journal is not None:
        server.store.journal.close()


if __name__ == "__main__":
    main()
