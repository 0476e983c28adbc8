"""Launcher of a detached process, sent by the SSH transport with `python3 -c` (its controller
half: usmlab/targets/ssh.py).

Arguments: EXIT_PATH OUT_PATH ERR_PATH LEASE_PATH ENV_JSON ARGV... It forks a wrapper in a new
session that starts ARGV with stdin from /dev/null and output to the files, appends "PID START"
to the lease's list (so the lease can stop the group if the connection drops), prints
`started WRAPPER_PID CHILD_PID` and returns at once; the wrapper waits for the child and writes
its exit status to EXIT_PATH. Standard library only, Python 3.8+.
"""

import json
import os
import signal
import subprocess
import sys

exit_path, out_path, err_path, lease_path, env_json = sys.argv[1:6]
argv = sys.argv[6:]
reader, writer = os.pipe()
if os.fork():
    os.close(writer)
    with os.fdopen(reader) as report:
        message = report.read()
    print(message)
    sys.exit(0 if message.startswith("started ") else 1)
os.close(reader)
try:
    os.setsid()
    if os.path.lexists(exit_path):
        os.remove(exit_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out = os.open(out_path, flags, 0o644)
    err = out if err_path == out_path else os.open(err_path, flags, 0o644)
    null = os.open(os.devnull, os.O_RDWR)
    with open("/proc/self/stat") as stat:
        started = stat.read().rsplit(")", 1)[1].split()[19]
    lease = os.open(lease_path, os.O_WRONLY | os.O_APPEND)
    os.write(lease, ("%d %s\n" % (os.getpid(), started)).encode())
    os.close(lease)
    for fd, target in ((0, null), (1, null), (2, err)):
        os.dup2(target, fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    env = dict(os.environ, **json.loads(env_json))
    child = subprocess.Popen(argv, stdin=null, stdout=out, stderr=err, env=env)
except OSError as exc:
    os.write(writer, ("%s: %s" % (exc.filename or argv[0], exc.strerror)).encode())
    os._exit(127)
os.write(writer, ("started %d %d" % (os.getpid(), child.pid)).encode())
os.close(writer)
code = child.wait()
with open(exit_path + ".tmp", "w") as done:
    done.write("%d\n" % code)
os.replace(exit_path + ".tmp", exit_path)
