#!/usr/bin/env bash
# The shell as the memory manager: a manual-ready session, narrated and checked.
#
# Run it:  examples/manual_ready.sh [--dir DIR]
#          (DIR: where the store, the mount point and the kernel's files go; by default a new
#          temporary directory, removed at the end)
#
# A `fusepager mount` daemon serves a memory object `notes`, and a kernel runs in a process of
# its own (`kernelsim run --connect ...`, k1, 4 KiB pages), taking console commands on its
# standard input.  The shell turns the pager's automatic answer off
# (user.mach.auto_ready=0) and then does, with echo and cat in the mount, what a memory manager
# does with messages:
#
#   - k1's first fault sends memory_object_init: kernels/k1/ appears without `ready`, and the
#     fault waits until the shell writes the attributes into kernels/k1/ready
#     (memory_object_ready);
#   - `echo 'lock 0 4096 w' > ctl` forbids writing page 0 (memory_object_lock_request): a task
#     that writes it waits (its memory_object_data_unlock is held) until `lock 0 4096 none`;
#   - `echo flush > ctl` takes the page back with its changes, `echo sync > ctl` stores them.
#
# Every step shows the command, what it printed, the new lines in the trace and k1's pagemap,
# and checks what it claims: the script exits non-zero with a message when something is not so.
# Whatever happens, the trap at the end stops the kernel and unmounts.
set -euo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }

HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(cd "$HERE/.." && pwd)/.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "manual_ready.sh: $PY is missing: run ./scripts/demo once to set up the venv" >&2
    exit 1
fi

DIR=""
while (($#)); do
    case $1 in
        --dir) DIR=${2:?--dir needs a directory}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "manual_ready.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
MADE_DIR=0
if [[ -z $DIR ]]; then
    DIR=$(mktemp -d /tmp/manual-ready.XXXXXX)
    MADE_DIR=1
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)  # as /proc/mounts will name it
if [[ $DIR =~ [[:space:]] ]]; then
    echo "manual_ready.sh: the work directory '$DIR' has white space in its name; use --dir DIR" >&2
    exit 2
fi
STORE=$DIR/store
MNT=$DIR/mnt
OBJ=$MNT/objects/notes
K1_IN=$DIR/k1.in
K1_OUT=$DIR/k1.out
KERNEL_PID=""
DAEMON_PID=""
ADDR=""
SENT=0     # commands sent to k1
ANSWER=""  # its last answer
OUT=""     # what the last command shown printed
MARK=0     # where the new lines of the trace start

# -- helpers -------------------------------------------------------------------------------------

die() {
    echo "manual_ready.sh: FAILED: $*" >&2
    exit 1
}

say() { printf '\n%s\n' "$*" | fold -s -w 100 | sed 's/ *$//'; }

indent() { sed 's/^/    /'; }

# show 'COMMAND': print the command as written (with $MNT, $OBJ ...), run it, print its output.
show() {
    printf '  $ %s\n' "$1"
    local out
    if ! out=$(eval "$1" 2>&1); then
        [[ -z $out ]] || printf '%s\n' "$out" | indent
        die "this command failed: $1"
    fi
    if [[ -n $out ]]; then printf '%s\n' "$out" | indent; fi
    OUT=$out
}

alive() {  # a process that has not exited (a zombie has)
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

in_mounts() { awk -v m="$MNT" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

# wait_for WHAT CONDITION [SECONDS]: poll the shell condition until it holds, or fail.
wait_for() {
    local what=$1 condition=$2 limit=${3:-10}
    local deadline=$((SECONDS + limit))
    until eval "$condition"; do
        ((SECONDS < deadline)) || die "$what: not within $limit s"
        if [[ -n $KERNEL_PID ]] && ! alive "$KERNEL_PID"; then
            die "$what: kernel process k1 has exited:$(printf '\n%s' "$(cat "$K1_OUT" "$DIR/k1.err" 2>/dev/null)")"
        fi
        sleep 0.02
    done
}

answers() { grep -vc '^#' "$K1_OUT" || true; }  # answer lines of k1 so far

k1_send() {  # type a command at k1's console, without waiting for the answer
    printf '  k1> %s\n' "$1"
    printf '%s\n' "$1" >&3
    SENT=$((SENT + 1))
}

k1_wait() {  # wait for k1's answer to the last command sent; it must be 'ok ...'
    wait_for "k1's answer to command $SENT" '(($(answers) >= SENT))'
    ANSWER=$(grep -v '^#' "$K1_OUT" | sed -n "${SENT}p")
    printf '    %s\n' "$ANSWER"
    [[ $ANSWER == ok* ]] || die "k1 answered: $ANSWER"
}

k1() { k1_send "$1"; k1_wait; }

trace_mark() { MARK=$(stat -c %s "$MNT/trace"); }

NEW=""
trace_new() {  # print the trace lines since the mark (without timestamps) and keep them in NEW
    NEW=$(tail -c +$((MARK + 1)) "$MNT/trace" | cut -d' ' -f2-)
    echo "  new lines in \$MNT/trace:"
    printf '%s\n' "$NEW" | indent
    trace_mark
}

new_has() { grep -qF -- "$1" <<<"$NEW"; }

pages() {  # k1's pagemap, shown
    show 'cat $OBJ/kernels/k1/pages'
    [[ -n $OUT ]] || echo "    (nothing: k1 holds no page of the object)"
}

cleanup() {
    local status=$?
    set +e
    trap - PIPE
    if [[ -n $KERNEL_PID ]]; then
        exec 3>&-  # the end of k1's commands: it returns what it changed and exits
        local deadline=$((SECONDS + 5))  # (one waiting for a held unlock never reads it)
        while alive "$KERNEL_PID" && ((SECONDS < deadline)); do sleep 0.05; done
        if alive "$KERNEL_PID"; then
            echo "manual_ready.sh: kernel k1 (pid $KERNEL_PID) did not exit; killing it" >&2
            kill -9 "$KERNEL_PID"
        fi
        wait "$KERNEL_PID" 2>/dev/null
    fi
    if in_mounts; then
        echo
        echo '  $ $PY -m fusepager umount $MNT'
        "$PY" -m fusepager umount "$MNT" 2>&1 | indent
        in_mounts && fusermount3 -u -z "$MNT"
    fi
    if [[ -n $DAEMON_PID ]]; then
        local deadline=$((SECONDS + 10))
        while alive "$DAEMON_PID" && ((SECONDS < deadline)); do sleep 0.05; done
        if alive "$DAEMON_PID"; then
            echo "manual_ready.sh: daemon (pid $DAEMON_PID) did not exit; killing it" >&2
            kill -9 "$DAEMON_PID"
        fi
    fi
    if ((MADE_DIR)) && ! in_mounts && ! mountpoint -q "$MNT"; then rm -rf "$DIR"; fi
    if ((status != 0)); then echo "manual_ready.sh: exit status $status" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'die "kernel k1 stopped reading its commands"' PIPE

# -- the session ---------------------------------------------------------------------------------

say "The shell as the memory manager. The paths, as shell variables (\`tail -f \$MNT/trace\` in another terminal shows every message as it goes):"
echo "  \$ PY=$PY"
echo "  \$ DIR=$DIR; STORE=\$DIR/store; MNT=\$DIR/mnt; OBJ=\$MNT/objects/notes"

say "Mount a store (in the background; its line says where kernel processes connect):"
show 'mkdir -p $STORE $MNT'
show '$PY -m fusepager mount $STORE $MNT'
ADDR=$(sed -n 's/.*kernels connect to \([^ ]*\).*/\1/p' <<<"$OUT")
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$OUT")
[[ -n $ADDR && -n $DAEMON_PID ]] || die "the mount did not say where kernels connect: $OUT"

say "A memory object, notes, of 16 KiB, with some text on its first page:"
show 'mkdir $OBJ'
show 'truncate -s 16K $OBJ/data'
show "printf 'written by: the shell' | dd of=\$OBJ/data conv=notrunc status=none"
show 'xxd -l 32 $OBJ/data'

say "Turn the pager's automatic answer to memory_object_init off: from now on the shell answers."
show 'setfattr -n user.mach.auto_ready -v 0 $OBJ'
show 'getfattr --absolute-names --only-values -n user.mach.auto_ready $OBJ; echo'
[[ $OUT == 0 ]] || die "auto_ready is '$OUT', not 0"

say "A kernel, k1, with 4 KiB pages, in a process of its own. By hand you would run it in another terminal and type at it; here its standard input is a FIFO the script writes to (fd 3) and its answers go to a file:"
show 'mkfifo $DIR/k1.in'
echo '  $ $PY -m kernelsim run --connect '"$ADDR"' --name k1 --page-size 4096 < $DIR/k1.in > $DIR/k1.out &'
"$PY" -m kernelsim run --connect "$ADDR" --name k1 --page-size 4096 <"$K1_IN" >"$K1_OUT" 2>"$DIR/k1.err" &
KERNEL_PID=$!
echo '  $ exec 3> $DIR/k1.in'
exec 3>"$K1_IN"
wait_for "k1 connecting" 'grep -q "^# kernel k1:" "$K1_OUT"'
indent <"$K1_OUT"

say "k1's task maps the object. Mapping sends nothing: no kernel uses it yet."
k1 'map notes 16K'
show 'ls $OBJ/kernels'
[[ -z $OUT ]] || die "kernels/ is not empty before k1's first fault"

say "The task reads: a fault. k1 sends memory_object_init and must wait for memory_object_ready before it may ask for data. The pager does not answer by itself now, so the read does not complete:"
trace_mark
k1_send 'read notes 21 text'
wait_for "kernels/k1 appearing" '[[ -d $OBJ/kernels/k1 ]] && grep -q "k1 -> notes memory_object_init(" "$MNT/trace"'
show 'ls $OBJ/kernels/k1'
[[ ! -e $OBJ/kernels/k1/ready ]] || die "kernels/k1/ready exists before the shell wrote it"
echo "    (no ready: nobody has answered k1's init)"
show 'cat $OBJ/kernels/k1/page_size'
[[ $OUT == 4096 ]] || die "k1's page_size is $OUT, not 4096"
trace_new
new_has 'k1 -> notes memory_object_init(' || die "no memory_object_init from k1 in the trace"
! new_has 'memory_object_ready(' || die "someone answered memory_object_ready: auto_ready=0 did not hold"
! new_has 'memory_object_data_request(' || die "k1 asked for data before it was ready"
(($(answers) < SENT)) || die "k1 answered the read before it was ready: $(tail -1 "$K1_OUT")"
echo "  => k1's read is waiting: it has not answered."

say "The shell answers, as the manager: writing the attributes into ready sends memory_object_ready, and the fault goes on (data_request, data_supply):"
show "echo 'may_cache=0 copy=call' > \$OBJ/kernels/k1/ready"
k1_wait
[[ $ANSWER == *"'written by: the shell'" ]] || die "k1 read something else: $ANSWER"
show 'cat $OBJ/kernels/k1/ready'
[[ $OUT == 'may_cache=0 copy=call' ]] || die "ready reads '$OUT'"
trace_new
new_has 'notes -> k1 memory_object_ready(may_cache=0 copy_strategy=call)' || die "no memory_object_ready with the shell's attributes"
new_has 'k1 -> notes memory_object_data_request(' || die "no data_request after ready"
new_has 'notes -> k1 memory_object_data_supply(' || die "no data_supply after ready"
pages
[[ $OUT == '0x0 4096 r-- precious' ]] || die "k1's pages: '$OUT', expected '0x0 4096 r-- precious'"
echo "  => ready answered by the shell; k1 holds page 0 read-only (a read was asked for)."

say "Now the shell forbids writing page 0 in every kernel: a lock (memory_object_lock_request with lock_value=-w-):"
show "echo 'lock 0 4096 w' > \$OBJ/ctl"
trace_new
new_has 'notes -> k1 memory_object_lock_request(offset=0x0 size=4096' || die "no lock_request to k1"
new_has 'lock_value=-w-' || die "the lock_request does not forbid writing"

say "k1's task writes to page 0. It must ask for write access (memory_object_data_unlock); the manager holds the request while the lock stands, so the write waits:"
k1_send 'write notes+12 a k1 task'
wait_for "k1's data_unlock held" 'grep -q "notes holds unlock from k1" "$MNT/trace"'
trace_new
new_has 'k1 -> notes memory_object_data_unlock(control=' || die "no data_unlock from k1"
new_has 'notes holds unlock from k1' || die "the manager did not hold k1's unlock"
(($(answers) < SENT)) || die "k1's write completed under the lock: $(tail -1 "$K1_OUT")"
pages
[[ $OUT == '0x0 4096 r-- precious' ]] || die "k1's pages: '$OUT', expected r-- while locked"
show 'xxd -l 32 $OBJ/data'
[[ $OUT == *'written by: the '* ]] || die "data changed while the write was held"
echo "  => the lock holds the writer: k1 has not answered, the data is unchanged."

say "The shell lifts the lock: the held unlock is granted (lock_request with lock_value=---), and the write completes:"
show "echo 'lock 0 4096 none' > \$OBJ/ctl"
k1_wait
[[ $ANSWER == 'ok write '* ]] || die "k1's write answered: $ANSWER"
trace_new
new_has 'notes -> k1 memory_object_lock_request(offset=0x0 size=4096 should_return=none should_flush=0 lock_value=---' \
    || die "no lock_request granting write access to k1"
pages
[[ $OUT == '0x0 4096 rw- dirty,precious' ]] || die "k1's pages: '$OUT', expected '0x0 4096 rw- dirty,precious'"
echo "  => k1 may write page 0 now and holds changes the store has not seen."

say "The shell flushes the object: k1 returns its changes (data_return) and drops the page:"
show 'echo flush > $OBJ/ctl'
trace_new
new_has 'notes -> k1 memory_object_lock_request(offset=0x0 size=16384 should_return=dirty should_flush=1' \
    || die "no flushing lock_request to k1"
new_has 'k1 -> notes memory_object_data_return(control=' || die "k1 returned nothing"
new_has 'k1 -> notes memory_object_lock_completed(' || die "k1 did not complete the lock request"
pages
[[ -z $OUT ]] || die "k1 still holds pages after the flush: $OUT"

say "sync makes it durable (the data file is fsynced): the mount and the store's own file show the task's write:"
show 'echo sync > $OBJ/ctl'
trace_new
new_has 'mount ctl notes: sync' || die "no sync in the trace"
show 'xxd -l 32 $OBJ/data'
SEEN=$OUT
[[ $SEEN == *'written by: a k1'* ]] || die "data does not show k1's write"
show 'xxd -l 32 $STORE/objects/notes/data'
[[ $OUT == "$SEEN" ]] || die "the store file differs from data"
echo "  => the same bytes in \$OBJ/data and in the store."

say "k1 reads again: the flush dropped its page, so it faults and is supplied the page anew:"
k1 'read notes 21 text'
[[ $ANSWER == *"'written by: a k1 task'" ]] || die "k1 read something else: $ANSWER"
trace_new
new_has 'k1 -> notes memory_object_data_request(' || die "k1 did not fault the page in again"

say "All checks passed: the shell answered ready, its lock held the writer, flush and sync brought the write to the store."
