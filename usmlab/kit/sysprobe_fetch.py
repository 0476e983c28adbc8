#!/usr/bin/env python3
"""Save system-probe's debug JSON to files, over its unix socket, without holding it in memory.

system-probe serves `/network_tracer/debug/http_monitoring`, `.../http2_monitoring` and
`/network_tracer/connections` on `/opt/datadog-agent/run/sysprobe.sock`; on a busy host a dump is
hundreds of megabytes, so the body is streamed straight to disk (Content-Length, chunked, or
read-until-close). Each `--path` pairs with the `--out` at the same position.

Once:      sysprobe_fetch.py --path P --out FILE [--path P2 --out FILE2 ...]
Periodic:  add `--every SECONDS --until-signal` (always together): every round fetches each path
           into a numbered file (`http_monitoring.json` -> `http_monitoring.0001.json`, the same
           number for every path of a round) until SIGINT/SIGTERM. A round in progress is finished
           first: the endpoints hand out per-client deltas, so an aborted fetch loses data for good.

Every file written is announced on stdout as one JSON line (seq, path, out, status, bytes), and
in periodic mode every finished round as {"round": N, "ok": files, "failed": paths that failed}.
Exit status: 0 ok, 2 usage, 3 socket missing or nobody listening, 5 permission denied,
6 HTTP error status, 7 malformed HTTP, 8 timeout or I/O error. In periodic mode only a missing
socket or a refused permission at the first round is fatal; later failures are reported on
stderr and the loop goes on.

Standard library only, Python 3.8+ (runs as root on the target).
"""

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import time

if __package__:  # imported on the controller as usmlab.kit.sysprobe_fetch
    from . import labkit
else:  # run on the target, where labkit.py is deployed beside this script
    import labkit

DEFAULT_SOCKET = "/opt/datadog-agent/run/sysprobe.sock"
CHUNK = 1 << 16
MAX_LINE = 1 << 16
MAX_HEADERS = 200

EXIT_SOCKET = 3
EXIT_PERMISSION = 5
EXIT_HTTP_STATUS = 6
EXIT_MALFORMED = 7
EXIT_IO = 8

STOP = labkit.StopFlag()  # SIGINT/SIGTERM: finish the step in progress, then end


class FetchError(Exception):
    """A one-line reason with the exit status that goes with it."""

    def __init__(self, message, code):
        Exception.__init__(self, message)
        self.code = code


def connect(socket_path, timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except OSError as err:
        sock.close()
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FetchError(
                "system-probe socket not found at %s (is system-probe running?)" % socket_path,
                EXIT_SOCKET,
            ) from None
        if err.errno == errno.ECONNREFUSED:
            raise FetchError(
                "nothing listens on %s: connection refused (system-probe stopped?)" % socket_path,
                EXIT_SOCKET,
            ) from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise FetchError(
                "permission denied on %s: run as root" % socket_path, EXIT_PERMISSION
            ) from None
        if isinstance(err, socket.timeout):
            raise FetchError("timed out connecting to %s" % socket_path, EXIT_IO) from None
        reason = err.strerror or err
        raise FetchError("cannot connect to %s: %s" % (socket_path, reason), EXIT_IO) from None
    return sock


def read_line(reader):
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise FetchError("malformed HTTP response: header line too long", EXIT_MALFORMED)
    if not line:
        raise FetchError("malformed HTTP response: connection closed early", EXIT_MALFORMED)
    return line


def read_head(reader):
    """(status, reason, headers with lower-case names); 1xx interim answers are skipped."""
    while True:
        status_line = read_line(reader).decode("latin-1").rstrip("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise FetchError(
                "malformed HTTP response: status line %r" % status_line[:80], EXIT_MALFORMED
            )
        headers = {}
        for _ in range(MAX_HEADERS):
            line = read_line(reader).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, sep, value = line.partition(":")
            if not sep:
                raise FetchError("malformed HTTP response: header %r" % line[:80], EXIT_MALFORMED)
            headers[name.strip().lower()] = value.strip()
        else:
            raise FetchError("malformed HTTP response: too many headers", EXIT_MALFORMED)
        status = int(parts[1])
        if status >= 200:
            return status, parts[2] if len(parts) > 2 else "", headers


def copy_exact(reader, out, length):
    left = length
    while left > 0:
        data = reader.read(min(CHUNK, left))
        if not data:
            raise FetchError(
                "malformed HTTP response: body ended after %d of %d bytes"
                % (length - left, length),
                EXIT_MALFORMED,
            )
        out.write(data)
        left -= len(data)
    return length


def copy_chunked(reader, out):
    total = 0
    while True:
        size_line = read_line(reader).decode("latin-1").strip()
        size_text = size_line.split(";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FetchError(
                "malformed HTTP response: chunk size %r" % size_line[:40], EXIT_MALFORMED
            ) from None
        if size == 0:
            while read_line(reader) not in (b"\r\n", b"\n"):  # trailers
                pass
            return total
        total += copy_exact(reader, out, size)
        if read_line(reader) not in (b"\r\n", b"\n"):
            raise FetchError("malformed HTTP response: no CRLF after a chunk", EXIT_MALFORMED)


def copy_to_eof(reader, out):
    total = 0
    while True:
        data = reader.read(CHUNK)
        if not data:
            return total
        out.write(data)
        total += len(data)


def error_detail(path):
    """system-probe answers a disabled protocol with {"error": "..."}; show that text."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return ""
    try:
        message = json.loads(head.decode("utf-8")).get("error")
    except (ValueError, AttributeError):
        message = None
    if not message:
        message = head.decode("utf-8", "replace").strip().splitlines()[0] if head.strip() else ""
    return ": " + str(message)[:200] if message else ""


def fetch(socket_path, url_path, out_path, timeout):
    """GET url_path, stream the body to out_path (atomically renamed); returns (status, bytes)."""
    sock = connect(socket_path, timeout)
    part = out_path + ".part"
    try:
        request = (
            "GET %s HTTP/1.1\r\nHost: unix\r\nUser-Agent: usmlab-sysprobe-fetch\r\n"
            "Accept: application/json\r\nConnection: close\r\n\r\n" % url_path
        )
        sock.sendall(request.encode("ascii"))
        reader = sock.makefile("rb", buffering=CHUNK)
        try:
            status, reason, headers = read_head(reader)
            with open(part, "wb") as out:
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    size = copy_chunked(reader, out)
                elif "content-length" in headers:
                    try:
                        length = int(headers["content-length"])
                    except ValueError:
                        raise FetchError(
                            "malformed HTTP response: Content-Length %r"
                            % headers["content-length"],
                            EXIT_MALFORMED,
                        ) from None
                    size = copy_exact(reader, out, length)
                else:
                    size = copy_to_eof(reader, out)
        finally:
            reader.close()
    except socket.timeout:
        _remove(part)
        raise FetchError(
            "timed out reading %s from %s" % (url_path, socket_path), EXIT_IO
        ) from None
    except FetchError:
        _remove(part)
        raise
    except OSError as err:
        _remove(part)
        reason = err.strerror or err
        raise FetchError("reading %s failed: %s" % (url_path, reason), EXIT_IO) from None
    finally:
        sock.close()
    if not 200 <= status < 300:
        detail = error_detail(part)
        _remove(part)
        raise FetchError(
            "system-probe answered %d %s for %s%s" % (status, reason, url_path, detail),
            EXIT_HTTP_STATUS,
        )
    os.replace(part, out_path)
    return status, size


def _remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def numbered(out_path, seq):
    """http_monitoring.json, 7 -> http_monitoring.0007.json"""
    folder, name = os.path.split(out_path)
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    numbered_name = "%s.%04d%s" % (stem, seq, "." + ext if ext else "")
    return os.path.join(folder, numbered_name)


def announce(seq, url_path, out_path, status, size):
    record = {"seq": seq, "path": url_path, "out": out_path, "status": status, "bytes": size}
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def run_once(args):
    """Every path is tried (a disabled protocol must not hide the others); first failure wins."""
    code = 0
    for url_path, out_path in args.pairs:
        if STOP.set:
            break
        try:
            status, size = fetch(args.socket, url_path, out_path, args.timeout)
        except FetchError as err:
            sys.stderr.write("error: %s\n" % err)
            sys.stderr.flush()
            code = code or err.code
            if err.code == EXIT_SOCKET:
                break  # the next paths would say the same
            continue
        announce(None, url_path, out_path, status, size)
    return code


def run_periodic(args):
    seq = 0
    last_error = {}
    while True:
        seq += 1
        started = time.monotonic()
        ok = 0
        for url_path, out_path in args.pairs:
            target = numbered(out_path, seq)
            try:
                status, size = fetch(args.socket, url_path, target, args.timeout)
            except FetchError as err:
                if seq == 1 and err.code in (EXIT_SOCKET, EXIT_PERMISSION):
                    sys.stderr.write("error: %s\n" % err)
                    return err.code
                # The same failure every round (a disabled protocol) is said once.
                if last_error.get(url_path) != str(err):
                    sys.stderr.write("warning: round %d: %s\n" % (seq, err))
                    sys.stderr.flush()
                last_error[url_path] = str(err)
                continue
            last_error.pop(url_path, None)
            announce(seq, url_path, target, status, size)
            ok += 1
        sys.stdout.write(json.dumps({"round": seq, "ok": ok, "failed": len(args.path) - ok}) + "\n")
        sys.stdout.flush()
        if STOP.set:
            return 0
        deadline = started + args.every
        while not STOP.set and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if STOP.set:
            return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="sysprobe_fetch.py")
    parser.add_argument("--socket", default=DEFAULT_SOCKET)
    parser.add_argument("--path", action="append", required=True, help="URL path (repeatable)")
    parser.add_argument("--out", action="append", required=True, help="file for the path")
    parser.add_argument("--every", type=float, help="seconds between rounds")
    parser.add_argument("--until-signal", action="store_true", help="repeat until SIGINT/TERM")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout, seconds")
    args = parser.parse_args(argv)
    if len(args.path) != len(args.out):
        parser.error("give one --out for every --path")
    args.pairs = [(args.path[i], args.out[i]) for i in range(len(args.path))]
    for url_path in args.path:
        if not url_path.startswith("/") or any(c in url_path for c in " \r\n"):
            parser.error("--path must start with / and contain no spaces: %r" % url_path)
    if bool(args.until_signal) != (args.every is not None):
        parser.error("--every SECONDS and --until-signal go together")
    if args.every is not None and args.every <= 0:
        parser.error("--every must be positive")
    for out_path in args.out:
        folder = os.path.dirname(os.path.abspath(out_path))
        if not os.path.isdir(folder):
            parser.error("folder for --out does not exist: %s" % folder)
    return args


def main(argv):
    args = parse_args(argv)
    STOP.install()
    if args.every:
        return run_periodic(args)
    return run_once(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
