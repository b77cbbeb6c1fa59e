# Shell functions that tests/controlplane/up.sh and tests/node/up.sh share. Source it with
# $state set to the state directory.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# start NAME ARGS...: starts a component in the background, logging to $state/NAME.log,
# with its PID in $state/NAME.pid and its command line in $state/NAME.cmd (tests restart
# components from it).
start() {
  local name=$1; shift
  printf '%q ' "$@" > "$state/$name.cmd"
  "$@" >> "$state/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}

# stop NAME...: stops each component by its recorded PID (TERM, then KILL after 5 s).
stop() {
  local name pid
  for name in "$@"; do
    [ -f "$state/$name.pid" ] || continue
    pid=$(cat "$state/$name.pid")
    kill "$pid" 2>/dev/null && for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$state/$name.pid"
  done
}
