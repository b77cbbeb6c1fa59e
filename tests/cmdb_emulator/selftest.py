#!/usr/bin/env python3
"""Self test of the CMDB watch emulator (stdlib only): python3 tests/cmdb_emulator/selftest.py"""
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
NO_EVENT = "MQ0xDTVlYTZkM2YzOTRjMWY1ZDk4NmU5YmQ4Ng1ub0V2ZW50DTENMQ=="
HDRS = {"X-Bkcmdb-Supplier-Account": "0", "X-Bkcmdb-User": "admin"}
FAILS = []


class Emu:
    def __init__(self, tmp, state, extra=()):
        self.port_file = os.path.join(tmp, "port")
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "emulator.py"), "--port-file", self.port_file, "--state", state,
             "--long-poll-seconds", "2", "--app", "herald:s3cret", *extra],
            stderr=open(os.path.join(tmp, "emulator.log"), "a"))
        for _ in range(100):
            if os.path.exists(self.port_file):
                break
            time.sleep(0.05)
        self.base = "http://127.0.0.1:%d" % int(open(self.port_file).read())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


def http(emu, method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(emu.base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def watch(emu, res, body, headers=HDRS):
    return http(emu, "POST", "/api/v3/event/watch/resource/" + res, body, headers)


def emit(emu, res, events):
    return http(emu, "POST", "/emulator/events", {"resource": res, "events": events})[1]["cursors"]


def check(name, cond, info=""):
    print("%s %s%s" % ("PASS" if cond else "FAIL", name, "" if cond else "  -- %s" % (info,)))
    if not cond:
        FAILS.append(name)


def events_of(resp):
    return resp["data"]["bk_events"]


def main():
    tmp = tempfile.mkdtemp(prefix="cmdb-emu-")
    state = os.path.join(tmp, "state.jsonl")
    emu = Emu(tmp, state)
    try:
        run(emu, tmp, state)
    finally:
        emu.stop()
    print("\n%d failure(s)" % len(FAILS) if FAILS else "\nall passed")
    sys.exit(1 if FAILS else 0)


def run(emu, tmp, state):
    st, r = http(emu, "GET", "/emulator/health")
    check("health", st == 200 and r == {"ok": True}, r)

    # header check: HTTP 500 / 1199027, Chinese by default, English on request
    st, r = watch(emu, "process", {}, headers={})
    check("header check: no supplier -> 500/1199027 [owner_id]", st == 500 and r["bk_error_code"] == 1199027
          and r["bk_error_msg"] == "[owner_id]授权信息查询失败" and r["result"] is False, (st, r))
    st, r = watch(emu, "process", {}, headers={"HTTP_BK_SUPPLIER_ACCOUNT": "0", "HTTP_BLUEKING_LANGUAGE": "en"})
    check("header check: no user -> 500/1199027 'user' (en)", st == 500
          and r["bk_error_msg"] == "'user' authorization information query failed", (st, r))

    # API gateway: header credentials only; wrong ones HTTP 400 / 1640001; cmdb's answer renamed
    gw = "/api/bk-cmdb/prod/api/v3/event/watch/resource/process"
    bad = json.dumps({"bk_app_code": "herald", "bk_app_secret": "nope", "bk_username": "admin"})
    st, r = http(emu, "POST", gw, {}, {"X-Bkapi-Authorization": bad})
    check("API gateway wrong secret -> HTTP 400 / 1640001", st == 400 and r["code"] == 1640001
          and r["code_name"] == "INVALID_ARGS" and r["result"] is False, (st, r))
    good = json.dumps({"bk_app_code": "herald", "bk_app_secret": "s3cret", "bk_username": "admin"})
    st, r = http(emu, "POST", gw, {}, {"X-Bkapi-Authorization": good})
    check("API gateway success: code/message, no bk_error_code", st == 200 and r["result"] is True
          and r["code"] == 0 and "bk_error_code" not in r and r["data"]["bk_watched"] is False, (st, r))
    st, r = http(emu, "POST", "/api/bk-cmdb/prod/api/v3/event/watch/resource/host", {}, {"X-Bkapi-Authorization": good})
    check("API gateway passes cmdb errors as code/message", st == 200 and r["result"] is False
          and r["code"] == 1199998, (st, r))

    # ESB
    esb = "/api/c/compapi/v2/cc/resource_watch/"
    st, r = http(emu, "POST", esb, {"bk_app_code": "herald", "bk_app_secret": "nope", "bk_username": "admin",
                                    "bk_resource": "process"})
    check("ESB wrong secret -> HTTP 200 / 1306000", st == 200 and r["result"] is False and r["code"] == 1306000
          and r["message"] == "APP Secret verification failed, pelase confirm if the APP Secret and APP Code "
                              "[bk_app_code=herald] match" and re.fullmatch("[0-9a-f]{32}", r["request_id"]), r)
    auth = json.dumps({"bk_app_code": "herald", "bk_app_secret": "s3cret", "bk_username": "admin"})
    st, r = http(emu, "POST", esb, {"bk_resource": "project"}, {"X-Bkapi-Authorization": auth})
    check("ESB success envelope", st == 200 and r["result"] is True and r["code"] == 0 and r["message"] == "success"
          and r["permission"] is None and re.fullmatch("[0-9a-f]{32}", r["request_id"])
          and r["data"]["bk_watched"] is False and events_of(r)[0]["bk_cursor"] == NO_EVENT, r)
    st, r = http(emu, "POST", esb, {"bk_resource": "host"}, {"X-Bkapi-Authorization": auth})
    check("ESB passes cmdb errors in its envelope", st == 200 and r["code"] == 1199998 and r["data"] is None, r)

    # validation
    t0 = time.time()
    st, r = watch(emu, "host", {"bk_resource": "host"})
    check("host without bk_fields -> 1199998 after 500 ms", st == 200 and r["bk_error_code"] == 1199998
          and r["bk_error_msg"] == "host event must have fields" and r["permission"] is None
          and time.time() - t0 >= 0.5, r)
    st, r = watch(emu, "set", {"bk_fields": ["bk_set_id"], "bk_filter": {"bk_sub_resource": "x"}})
    check("sub resource on set -> 1199998", r["bk_error_code"] == 1199998
          and r["bk_error_msg"] == "set event cannot have sub resource", r)
    st, r = watch(emu, "process", {"bk_cursor": "x", "bk_start_from": 5})
    check("cursor + start_from -> 1199998", r["bk_error_msg"] == "bk_start_from and bk_cursor can not use at the same time", r)
    st, r = watch(emu, "process", {"bk_event_types": ["create", "modify"]})
    check("bad event type -> 1199998", r["bk_error_msg"] == "unsupported event type", r)
    st, r = watch(emu, "process", {"bk_start_from": "yesterday"})
    check("type error -> 1199000", r["bk_error_code"] == 1199000, r)
    st, r = watch(emu, "widget", {})
    check("unknown resource -> 1199998", r["bk_error_code"] == 1199998, r)

    # from now
    st, r = watch(emu, "process", {})
    ev = events_of(r)
    check("from now, empty chain -> no-event cursor", r["result"] is True and r["data"]["bk_watched"] is False
          and ev == [{"bk_cursor": NO_EVENT, "bk_resource": "process", "bk_event_type": "", "bk_detail": None}], r)
    cur = emit(emu, "process", [{"type": "create", "detail": {"bk_process_id": 1, "bk_process_name": "a"}},
                                {"type": "update", "detail": {"bk_process_id": 1, "bk_process_name": "b"}}])
    st, r = watch(emu, "process", {})
    ev = events_of(r)
    check("from now, non-empty chain -> latest event, watched", r["data"]["bk_watched"] is True and len(ev) == 1
          and ev[0]["bk_cursor"] == cur[1] and ev[0]["bk_event_type"] == "update"
          and ev[0]["bk_detail"]["bk_process_name"] == "b", r)
    raw = base64.b64decode(cur[0]).decode().split("\r")
    check("cursor format 1\\r9\\r<oid>\\rinsert\\r<sec>\\r<nano>\\r", raw[:2] == ["1", "9"] and len(raw[2]) == 24
          and raw[3] == "insert" and abs(int(raw[4]) - time.time()) < 60, raw)
    st, r = watch(emu, "process", {"bk_event_types": ["create"]})
    check("from now, latest not matching -> no-event cursor", events_of(r)[0]["bk_cursor"] == NO_EVENT, r)

    # long poll: prompt wake-up
    out = {}

    def bg():
        t = time.time()
        out["r"] = watch(emu, "process", {"bk_cursor": cur[1]})[1]
        out["dt"] = time.time() - t
    th = threading.Thread(target=bg)
    th.start()
    time.sleep(0.5)
    cur2 = emit(emu, "process", [{"type": "delete", "detail": {"bk_process_id": 1, "bk_process_name": "b"}}])
    th.join()
    ev = events_of(out["r"])
    check("long poll returns promptly on emit", out["dt"] < 1.2 and len(ev) == 1 and ev[0]["bk_cursor"] == cur2[0]
          and ev[0]["bk_event_type"] == "delete" and ev[0]["bk_detail"]["bk_process_name"] == "b", out)
    # long poll: timeouts
    t = time.time()
    st, r = watch(emu, "process", {"bk_cursor": cur[0], "bk_event_types": ["create"]})
    dt = time.time() - t
    check("long poll timeout, non-empty chain -> latest cursor, watched=false", 2 <= dt < 3.5
          and r["data"]["bk_watched"] is False and events_of(r) == [
              {"bk_cursor": cur2[0], "bk_resource": "process", "bk_event_type": "", "bk_detail": None}], (dt, r))
    t = time.time()
    st, r = watch(emu, "plat", {"bk_cursor": NO_EVENT})
    dt = time.time() - t
    check("long poll timeout, empty chain -> caller's cursor echoed", 2 <= dt < 3.5
          and events_of(r)[0]["bk_cursor"] == NO_EVENT and r["data"]["bk_watched"] is False, (dt, r))
    st, r = watch(emu, "process", {"bk_cursor": "MQ0yDTE1ODkyMDcyODENMQ01ZWI3ZWZjNTBiOTA5ZTYyMGFmYWQzZGY="})
    check("unknown cursor -> 1103007", r["bk_error_code"] == 1103007 and r["bk_error_msg"] == "事件节点不存在", r)

    # paging with 450 events
    c0 = emit(emu, "module", [{"type": "create", "detail": {"bk_module_id": 0}}])[0]
    cs = emit(emu, "module", [{"type": "update", "detail": {"bk_module_id": i, "bk_module_name": "m%d" % i}}
                              for i in range(1, 451)])
    pages, c = [], c0
    for _ in range(3):
        r = watch(emu, "module", {"bk_cursor": c, "bk_fields": ["bk_module_id"]})[1]
        pages.append(len(events_of(r)))
        c = events_of(r)[-1]["bk_cursor"]
    check("page limit 200 with 450 events: 200/200/50", pages == [200, 200, 50] and c == cs[-1], pages)
    r = watch(emu, "module", {"bk_cursor": NO_EVENT, "bk_fields": ["bk_module_id"]})[1]
    ev = events_of(r)
    check("no-event cursor replays retained history from the earliest (201 quirk)", len(ev) == 201
          and ev[0]["bk_cursor"] == c0 and ev[200]["bk_cursor"] == cs[199], len(ev))
    r = watch(emu, "module", {"bk_start_from": int(time.time()) - 100, "bk_fields": ["bk_module_id"]})[1]
    check("start_from inside the window -> earliest + 200", len(events_of(r)) == 201
          and events_of(r)[0]["bk_cursor"] == c0, len(events_of(r)))
    r = watch(emu, "module", {"bk_start_from": int(time.time()), "bk_fields": ["bk_module_id"]})[1]
    check("start_from at/after latest second -> like from now", events_of(r)[0]["bk_cursor"] == cs[-1]
          and r["data"]["bk_watched"] is True, r)
    t = time.time()
    r = watch(emu, "module", {"bk_start_from": int(time.time()) - 10801, "bk_fields": ["bk_module_id"]})[1]
    check("start_from older than TTL -> 1199006 (no sleep)", r["bk_error_code"] == 1199006
          and r["bk_error_msg"] == "'bk_start_from' 数据参数校验不通过" and time.time() - t < 0.4, r)
    r = watch(emu, "module", {"bk_start_from": int(time.time()) + 60, "bk_fields": ["bk_module_id"]})[1]
    check("start_from in the future -> 1199006", r["bk_error_code"] == 1199006, r)

    # projection
    r = watch(emu, "module", {"bk_cursor": cs[-2], "bk_fields": ["bk_module_name", "no_such_field"]})[1]
    check("projection: exactly the fields, missing -> null", events_of(r)[0]["bk_detail"] ==
          {"bk_module_name": "m450", "no_such_field": None}, r)

    # sub resource filter on object_instance
    oc = emit(emu, "object_instance", [
        {"type": "create", "detail": {"bk_obj_id": "switch", "bk_inst_id": 7, "bk_inst_name": "s7"}},
        {"type": "create", "detail": {"bk_obj_id": "router", "bk_inst_id": 8, "bk_inst_name": "r8"}}])
    r = watch(emu, "object_instance", {"bk_cursor": NO_EVENT, "bk_filter": {"bk_sub_resource": "router"}})[1]
    check("bk_sub_resource filters by bk_obj_id; uniq key = bk_inst_id", [e["bk_cursor"] for e in events_of(r)]
          == [oc[1]] and base64.b64decode(oc[1]).decode().endswith("\r8"), r)

    # expiry
    r = http(emu, "POST", "/emulator/expire", {"resource": "process"})[1]
    check("expire drops the chain", r == {"dropped": 3}, r)
    r = watch(emu, "process", {"bk_cursor": cur[0]})[1]
    check("after expire, old cursor -> 1103007", r["result"] is False and r["bk_error_code"] == 1103007, r)
    r = watch(emu, "process", {})[1]
    check("after expire, from now -> no-event cursor", events_of(r)[0]["bk_cursor"] == NO_EVENT, r)
    threading.Timer(0.3, lambda: emit(emu, "process", [{"type": "create", "detail": {"bk_process_id": 2}}])).start()
    r = watch(emu, "process", {"bk_cursor": cur2[0]})[1]
    check("after expire, last-cursor token continues with new events", r["data"]["bk_watched"] is True
          and events_of(r)[0]["bk_detail"] == {"bk_process_id": 2}, r)
    check("chain endpoint", http(emu, "GET", "/emulator/chain/process")[1]["nodes"][0]["detail"] ==
          {"bk_process_id": 2})

    # outage
    http(emu, "POST", "/emulator/outage", {"status": 503, "seconds": 60})
    st, body = watch(emu, "process", {})
    st2, _ = http(emu, "POST", "/api/c/compapi/v2/cc/resource_watch/", {})
    check("outage -> 503 plain text", st == 503 and st2 == 503 and isinstance(body, str), (st, body))
    http(emu, "POST", "/emulator/outage", {"seconds": 0})
    st, r = watch(emu, "process", {})
    check("outage ended -> recovers", st == 200 and r["result"] is True, (st, r))

    # misc HTTP
    check("GET on a watch endpoint -> 405", http(emu, "GET", "/api/v3/event/watch/resource/host")[0] == 405)
    check("unknown path -> 404", http(emu, "POST", "/api/v3/nothing", {})[0] == 404)
    s = http(emu, "GET", "/emulator/stats")[1]
    check("stats", s["requests"]["direct"] > 20 and s["requests"]["esb"] == 4 and s["auth_refused"] == 4 and s["requests"]["apigw"] == 3
          and s["errors"].get("1103007") == 2 and s["outage_answers"] == 2 and s["events_answered"] > 800, s)

    # restart with the same --state
    before = http(emu, "GET", "/emulator/chain/module")[1]
    emu.stop()
    emu2 = Emu(tmp, state)
    try:
        after = http(emu2, "GET", "/emulator/chain/module")[1]
        check("restart: same chain", before == after, (len(before["nodes"]), len(after["nodes"])))
        r = watch(emu2, "module", {"bk_cursor": cs[99], "bk_fields": ["bk_module_id"]})[1]
        check("restart: cursors still valid", events_of(r)[0]["bk_cursor"] == cs[100] and len(events_of(r)) == 200, r)
        r = watch(emu2, "process", {"bk_cursor": cur[0]})[1]
        check("restart: expiry persisted", r["bk_error_code"] == 1103007, r)
        new = emit(emu2, "process", [{"type": "update", "detail": {"bk_process_id": 2}}])
        old = http(emu2, "GET", "/emulator/chain/process")[1]["nodes"]
        check("restart: new cursors are unique and later", len(old) == 2 and new[0] not in cur + cur2
              and old[1]["cursor"] == new[0], old)
        t = time.time()
        big = emit(emu2, "host", [{"type": "create", "detail": {"bk_host_id": i, "bk_host_innerip": "10.0.0.%d" % (i % 250)}}
                                  for i in range(5000)])
        dt = time.time() - t
        check("5000 events in one call quickly (%.2fs)" % dt, len(big) == 5000 and len(set(big)) == 5000 and dt < 3)
        r = watch(emu2, "host", {"bk_cursor": big[0], "bk_fields": ["bk_host_id", "bk_cloud_id"]})[1]
        check("host page after bulk emit", len(events_of(r)) == 200 and events_of(r)[0]["bk_detail"] ==
              {"bk_host_id": 1, "bk_cloud_id": None}, events_of(r)[0])
    finally:
        emu2.stop()
    check("SIGTERM exits cleanly", emu2.proc.returncode == 0, emu2.proc.returncode)

    # --no-event-cursor wire: the value bk-cmdb >= v3.10 really sends; the doc value is then unknown
    emu3 = Emu(tmp, os.path.join(tmp, "state3.jsonl"), ("--no-event-cursor", "wire"))
    try:
        r = watch(emu3, "plat", {})[1]
        wire = events_of(r)[0]["bk_cursor"]
        r2 = watch(emu3, "plat", {"bk_cursor": NO_EVENT})[1]
        check("--no-event-cursor wire", wire == NO_EVENT[:-2] + "0=" and r2["bk_error_code"] == 1103007, (wire, r2))
    finally:
        emu3.stop()


if __name__ == "__main__":
    main()
