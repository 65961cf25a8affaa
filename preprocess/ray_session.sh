#!/usr/bin/env bash
# Starts and stops this project's Ray on a node by its process session, never anyone else's
# (the cluster configs' start commands; a bare `ray stop` stops every Ray process on the machine
# that it can signal, other users' and other jobs' too):
#
#   ray_session.sh start ROLE ARGS...   `ray start ARGS...` in a new session, whose id is recorded
#   ray_session.sh stop ROLE            stops what `start ROLE` started; nothing if it never ran
#
# ROLE (head, worker) names the record: a head and a worker may share a machine and a home.
set -uo pipefail
action=$1 role=$2
shift 2
record="$HOME/.ray/wav2vec2-$role.sid"

wait_until_gone() {  # session, tries, seconds between them
    for _ in $(seq "$2"); do
        pgrep -s "$1" -f ray >/dev/null || return 0
        sleep "$3"
    done
}

case $action in
start)
    mkdir -p "$(dirname "$record")"
    # -w: return when `ray start` does, as `ray up` expects; its daemons stay in the session.
    exec setsid -w bash -c 'echo $$ > "$0" && exec ray start "$@"' "$record" "$@"
    ;;
stop)
    session=$(cat "$record" 2>/dev/null) || exit 0
    [ -n "$session" ] || exit 0
    pkill -TERM -s "$session" -f ray
    wait_until_gone "$session" 20 0.5
    pkill -KILL -s "$session" -f ray
    # pkill returns before the killed processes are gone, and Ray 2.60's `ray start --head`
    # refuses to start while a raylet on the machine still names the old head's address.
    wait_until_gone "$session" 50 0.2
    rm -f "$record"
    ;;
*)
    echo "usage: ray_session.sh start|stop ROLE [ray start ARGS...]" >&2
    exit 2
    ;;
esac
