// Command goclient is the lab's Go crypto/tls HTTPS client.
//
// The misattribution USM showed in production came from Go-TLS uprobes, and a Python (OpenSSL)
// client never reproduced it; a Go client with connection churn did (docs/background.md). It
// speaks the same flags and writes the same client.jsonl (docs/formats.md) as the Python client,
// plus the knobs that made the bug appear: a new http.Transport per request, response bodies
// left unclosed, forced garbage collections. Standard library only, builds with Go 1.19.
//
// Request k is due at t0 + k*interval whatever earlier requests took, so runs are comparable.
// The bug reproduced with two servers on different ports, each answering a path that names it,
// so one client rotates over several servers (-url a,b: request k goes to url k%n) and a path
// can name the server it is sent to (--paths /server{port}/identify).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const (
	defaultURL      = "https://127.0.0.1:8443"
	defaultCount    = "10"
	defaultInterval = "1s"
	defaultTimeout  = "10s"
	userAgent       = "usmlab-go-client/1"
	// After SIGINT/SIGTERM, in-flight requests get this long to finish before being abandoned.
	stopGrace = 2 * time.Second
	// CLOCK_MONOTONIC in <time.h>; the syscall package does not export it.
	clockMonotonic = 1
	exitOK         = 0
	exitFailed     = 1
	exitUsage      = 2
)

// The 8 paths the original client rotated through (docs/background.md).
var defaultPaths = []string{
	"/api/v1/persistentvolumes/pvc-63958627-daf8-4858-bf79-3818733c87b4",
	"/api/v1/persistentvolumes/pvc-33641375-8db3-4ff3-b172-2ba76ce132fe",
	"/api/v1/persistentvolumes/pvc-12345678-1234-1234-1234-123456789abc",
	"/api/v1/namespaces/orgstore-maze/configmaps",
	"/api/v1/namespaces/postgres-orgstore-proposals/configmaps",
	"/api/v1/namespaces/datadog-agent/configmaps",
	"/api/v1/namespaces/zookeeper-lockness/configmaps",
	"/api/v1/namespaces/kube-system/pods",
}

// monoNow is CLOCK_MONOTONIC in seconds, the clock of Python's time.monotonic() and of the
// trace_pipe timestamps once trace_clock is "mono". Go hides its own monotonic reading, so ask
// the kernel (SYS_CLOCK_GETTIME exists on amd64 and arm64 alike).
func monoNow() float64 {
	var ts syscall.Timespec
	_, _, errno := syscall.RawSyscall(
		syscall.SYS_CLOCK_GETTIME, clockMonotonic, uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		panic("clock_gettime(CLOCK_MONOTONIC): " + errno.Error())
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func wallNow() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// ---------------------------------------------------------------------------------------------
// Configuration

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...interface{}) error {
	return usageError{fmt.Sprintf(format, args...)}
}

// target is one server the client sends to.
type target struct {
	host     string
	port     int
	basePath string
	remote   string // host:port as written in client.jsonl
	origin   string // https://host:port
}

type config struct {
	targets     []target // request k goes to targets[k%len(targets)]
	count       int
	interval    float64 // seconds
	duration    float64 // seconds; 0 = no limit
	concurrency int
	reuse       bool
	paths       []string
	cacert      string
	logPath     string
	timeout     time.Duration
	check       bool
	http2       bool
	perRequest  bool
	skipClose   float64
	gcEvery     int
	connLogPath string
	// closeNothing: raw TLS without net/http; every connection is dropped without Close, so
	// only the runtime's GC (the netFD finalizer) closes its socket.
	closeNothing bool
}

var plainNumber = regexp.MustCompile(`^(\d+(\.\d*)?|\.\d+)$`)

// parseDuration reads "2s", "500ms", "1m30s" (Go syntax) or plain seconds like "0.1".
func parseDuration(name, text string) (float64, error) {
	spec := strings.TrimSpace(text)
	if strings.HasPrefix(spec, "-") {
		return 0, usagef("%s must not be negative: %q", name, text)
	}
	if plainNumber.MatchString(spec) {
		return strconv.ParseFloat(spec, 64)
	}
	d, err := time.ParseDuration(spec)
	if err != nil || strings.HasPrefix(spec, "+") {
		return 0, usagef("invalid %s %q (use e.g. 2s, 500ms, 1m30s or plain seconds like 0.1)",
			name, text)
	}
	return d.Seconds(), nil
}

func parseURL(text string) (host string, port int, basePath string, err error) {
	u, perr := url.Parse(strings.TrimSpace(text))
	bad := usagef("invalid url %q: expected https://host[:port][/path]", text)
	if perr != nil || u.Scheme != "https" || u.Host == "" || u.Opaque != "" {
		return "", 0, "", bad
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return "", 0, "", usagef("invalid url %q: no user, query or fragment allowed", text)
	}
	host = u.Hostname()
	port = 443
	if p := u.Port(); p != "" {
		n, cerr := strconv.Atoi(p)
		if cerr != nil || n < 1 || n > 65535 {
			return "", 0, "", usagef("invalid url %q: bad port", text)
		}
		port = n
	}
	if host == "" {
		return "", 0, "", bad
	}
	return host, port, strings.TrimRight(u.Path, "/"), nil
}

// parseURLs reads comma-separated https URLs; request k goes to the k%n-th.
func parseURLs(text string) ([]target, error) {
	var targets []target
	for _, part := range strings.Split(text, ",") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		host, port, basePath, err := parseURL(part)
		if err != nil {
			return nil, err
		}
		remote := net.JoinHostPort(host, strconv.Itoa(port))
		targets = append(targets, target{host: host, port: port, basePath: basePath,
			remote: remote, origin: "https://" + remote})
	}
	if len(targets) == 0 {
		return nil, usagef("invalid url %q: expected https://host[:port][/path]", text)
	}
	return targets, nil
}

// portToken is the one token a path may contain: the port of the server the request goes to.
const portToken = "{port}"

var braced = regexp.MustCompile(`\{[^{}]*\}`)

func parsePaths(text string) ([]string, error) {
	var paths []string
	for _, part := range strings.Split(text, ",") {
		p := strings.TrimSpace(part)
		if p == "" {
			continue
		}
		if !strings.HasPrefix(p, "/") || strings.IndexFunc(p, isSpace) >= 0 {
			return nil, usagef("invalid path %q: paths start with / and have no spaces", p)
		}
		if rest := strings.ReplaceAll(p, portToken, ""); strings.ContainsAny(rest, "{}") {
			problem := "unmatched brace"
			if unknown := braced.FindString(rest); unknown != "" {
				problem = "unknown token " + unknown
			}
			return nil, usagef("invalid path %q: %s (the only token is %s)", p, problem, portToken)
		}
		paths = append(paths, p)
	}
	if len(paths) == 0 {
		return nil, usagef("--paths needs at least one path")
	}
	return paths, nil
}

// expandPath is the path as sent: {port} replaced by the port of the server it goes to.
func expandPath(template string, port int) string {
	return strings.ReplaceAll(template, portToken, strconv.Itoa(port))
}

func isSpace(r rune) bool {
	return r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\v' || r == '\f'
}

func parseWhole(name, text string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(text))
	if err != nil {
		return 0, usagef("%s must be a whole number, got %q", name, text)
	}
	return n, nil
}

// parseConfig validates the command line; usage problems come back as usageError.
func parseConfig(args []string) (*config, error) {
	fs := flag.NewFlagSet("goclient", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	rawURL := fs.String("url", defaultURL, "https://host[:port][/prefix], or several comma-separated")
	count := fs.String("count", defaultCount, "requests to send, 0 = until stopped")
	interval := fs.String("interval", defaultInterval, "time between request starts: 2s, 500ms, 0.1")
	concurrency := fs.String("concurrency", "1", "worker goroutines")
	connection := fs.String("connection", "new", "new: a TLS connection per request; reuse: keep-alive per worker")
	duration := fs.String("duration", "", "stop scheduling after this long")
	paths := fs.String("paths", "", "comma-separated paths, used in rotation; {port} = port of the request's server")
	cacert := fs.String("cacert", "", "verify the server against this CA (PEM)")
	logPath := fs.String("log", "", "client.jsonl path (appended to)")
	timeout := fs.String("timeout", defaultTimeout, "per-request timeout")
	check := fs.Bool("check", false, "only wait for a TLS handshake with every url")
	http2 := fs.Bool("http2", false, "offer h2 by ALPN and use HTTP/2 when the server speaks it")
	perRequest := fs.Bool("transport-per-request", false, "a new http.Transport (keep-alives off) per request")
	skipClose := fs.String("skip-close", "0", "fraction 0..1 of responses whose body is neither read nor closed")
	gcEvery := fs.String("gc-every", "0", "runtime.GC() every N requests (0 = never)")
	connLog := fs.String("conn-log", "", "JSON lines of connection opens and tls.Conn closes (appended to)")
	closeNothing := fs.Bool("close-nothing", false, "raw TLS, no net/http: drop every connection without Close (GC closes the socket)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	cfg := &config{cacert: *cacert, logPath: *logPath, check: *check, http2: *http2,
		perRequest: *perRequest, paths: defaultPaths, connLogPath: *connLog,
		closeNothing: *closeNothing}
	var err error
	if cfg.targets, err = parseURLs(*rawURL); err != nil {
		return nil, err
	}
	if cfg.interval, err = parseDuration("interval", *interval); err != nil {
		return nil, err
	}
	timeoutS, err := parseDuration("timeout", *timeout)
	if err != nil {
		return nil, err
	}
	if timeoutS <= 0 {
		return nil, usagef("timeout must be > 0")
	}
	cfg.timeout = time.Duration(timeoutS * float64(time.Second))
	if set["duration"] {
		if cfg.duration, err = parseDuration("duration", *duration); err != nil {
			return nil, err
		}
		if cfg.duration <= 0 {
			return nil, usagef("duration must be > 0")
		}
	}
	if set["paths"] {
		if cfg.paths, err = parsePaths(*paths); err != nil {
			return nil, err
		}
	}
	if cfg.count, err = parseWhole("count", *count); err != nil {
		return nil, err
	}
	if cfg.count < 0 {
		return nil, usagef("count must be >= 0 (0 = until stopped), got %d", cfg.count)
	}
	if cfg.concurrency, err = parseWhole("concurrency", *concurrency); err != nil {
		return nil, err
	}
	if cfg.concurrency < 1 {
		return nil, usagef("concurrency must be >= 1, got %d", cfg.concurrency)
	}
	switch *connection {
	case "new":
	case "reuse":
		cfg.reuse = true
	default:
		return nil, usagef("--connection must be new or reuse, got %q", *connection)
	}
	if cfg.closeNothing && (cfg.reuse || cfg.http2) {
		return nil, usagef("--close-nothing opens a connection per request over HTTP/1.1: " +
			"it cannot be combined with --connection reuse or --http2")
	}
	if cfg.reuse && cfg.perRequest {
		return nil, usagef("--transport-per-request opens a connection per request: " +
			"it cannot be combined with --connection reuse")
	}
	cfg.skipClose, err = strconv.ParseFloat(strings.TrimSpace(*skipClose), 64)
	if err != nil || math.IsNaN(cfg.skipClose) || cfg.skipClose < 0 || cfg.skipClose > 1 {
		return nil, usagef("--skip-close must be a fraction between 0 and 1, got %q", *skipClose)
	}
	if cfg.gcEvery, err = parseWhole("gc-every", *gcEvery); err != nil {
		return nil, err
	}
	if cfg.gcEvery < 0 {
		return nil, usagef("gc-every must be >= 0, got %d", cfg.gcEvery)
	}
	return cfg, nil
}

func tlsConfig(cfg *config) (*tls.Config, error) {
	if cfg.cacert == "" {
		// The lab's server certificate is self-signed unless a CA is given.
		return &tls.Config{InsecureSkipVerify: true}, nil //nolint:gosec
	}
	pem, err := os.ReadFile(cfg.cacert)
	if err != nil {
		return nil, usagef("cannot load CA file %s: %s", cfg.cacert, oneLine(err))
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, usagef("cannot load CA file %s: no PEM certificate in it", cfg.cacert)
	}
	// No ServerName: each connection verifies the host of its own URL (net/http and
	// checkReady fill it in per server).
	return &tls.Config{RootCAs: pool}, nil
}

// ---------------------------------------------------------------------------------------------
// Records and statistics

// record is one client.jsonl line; the field order is the one of docs/formats.md.
type record struct {
	Seq           int      `json:"seq"`
	Pid           int      `json:"pid"`
	Tid           int      `json:"tid"`
	LocalAddr     *string  `json:"local_addr"`
	LocalPort     *int     `json:"local_port"`
	Remote        string   `json:"remote"`
	Method        string   `json:"method"`
	Path          string   `json:"path"`
	Status        *int     `json:"status"`
	Error         *string  `json:"error"`
	ScheduledMono float64  `json:"scheduled_mono"`
	StartMono     float64  `json:"start_mono"`
	EndMono       *float64 `json:"end_mono"`
	StartWall     float64  `json:"start_wall"`
	EndWall       *float64 `json:"end_wall"`
	ConnID        *string  `json:"conn_id"`
	// The request was handed to TLS (GotConn: net/http writes it next); false when connecting
	// or the handshake failed, so nothing of it could be captured.
	WroteRequest bool `json:"wrote_request"`
	// The connection as Go's runtime and the kernel know it (docs/formats.md): the *tls.Conn
	// and *net.netFD addresses USM's caches are keyed by, and the socket's fd number.
	TLSConn *string `json:"tls_conn,omitempty"`
	NetFD   *string `json:"net_fd,omitempty"`
	FD      *int    `json:"fd,omitempty"`
}

// connEvent is one --conn-log line: a connection opened (its addresses, fd and local port),
// or its tls.Conn closed (Close ran: net/http, or the body's Close, called it).
type connEvent struct {
	Event     string  `json:"event"`
	Pid       int     `json:"pid"`
	ConnID    string  `json:"conn_id"`
	TLSConn   string  `json:"tls_conn"`
	NetFD     string  `json:"net_fd,omitempty"`
	FD        *int    `json:"fd,omitempty"`
	LocalPort int     `json:"local_port,omitempty"`
	Remote    string  `json:"remote,omitempty"`
	Mono      float64 `json:"mono"`
}

func (r *record) ok() bool {
	return r.Error == nil && r.Status != nil && *r.Status >= 200 && *r.Status < 400
}

// oneLine is an error as a single line, as client.jsonl's error field requires; the URL that
// net/http prefixes is dropped (the record has the path already).
func oneLine(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return strings.Join(strings.Fields(err.Error()), " ")
}

// percentile is the nearest-rank percentile (an observed value), NaN when empty.
func percentile(sorted []float64, pct float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	rank := int(math.Ceil(pct / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	if rank > len(sorted) {
		rank = len(sorted)
	}
	return sorted[rank-1]
}

func spreadMs(seconds []float64) string {
	sort.Float64s(seconds)
	parts := make([]string, 0, 3)
	for _, kv := range []struct {
		key string
		val float64
	}{{"p50", percentile(seconds, 50)}, {"p99", percentile(seconds, 99)},
		{"max", percentile(seconds, 100)}} {
		if math.IsNaN(kv.val) {
			parts = append(parts, kv.key+"=-")
		} else {
			parts = append(parts, fmt.Sprintf("%s=%.1f", kv.key, kv.val*1000))
		}
	}
	return strings.Join(parts, " ")
}

// remoteCount is one server's share of the requests.
type remoteCount struct{ sent, ok int }

// summary mirrors the Python client's: counts, latency of successes, start jitter of all
// (jitter = start_mono - scheduled_mono: how late each request left its slot), and with
// several servers one line per server (remotes in url order), to show each got its share.
func summary(records []*record, remotes []string) []string {
	var latencies, jitters []float64
	ok := 0
	conns := map[string]bool{}
	first, last := math.Inf(1), math.Inf(-1)
	perRemote := map[string]*remoteCount{}
	order := []string{}
	count := func(remote string) *remoteCount {
		if perRemote[remote] == nil {
			perRemote[remote] = &remoteCount{}
			order = append(order, remote)
		}
		return perRemote[remote]
	}
	for _, remote := range remotes {
		count(remote)
	}
	for _, r := range records {
		rc := count(r.Remote)
		rc.sent++
		if r.ok() {
			rc.ok++
			ok++
			if r.EndMono != nil {
				latencies = append(latencies, *r.EndMono-r.StartMono)
			}
		}
		jitters = append(jitters, r.StartMono-r.ScheduledMono)
		if r.ConnID != nil {
			conns[*r.ConnID] = true
		}
		first = math.Min(first, r.StartMono)
		if r.EndMono != nil {
			last = math.Max(last, *r.EndMono)
		}
	}
	elapsed := 0.0
	if len(records) > 0 && !math.IsInf(last, -1) {
		elapsed = last - first
	}
	rate := "-"
	if elapsed > 0 {
		rate = fmt.Sprintf("%.1f", float64(len(records))/elapsed)
	}
	lines := []string{
		fmt.Sprintf("Summary: sent=%d ok=%d failed=%d connections=%d in %.2f s (%s req/s)",
			len(records), ok, len(records)-ok, len(conns), elapsed, rate),
		"Latency ms: " + spreadMs(latencies),
		"Start jitter ms: " + spreadMs(jitters),
	}
	if len(order) > 1 {
		for _, remote := range order {
			rc := perRemote[remote]
			lines = append(lines, fmt.Sprintf("Remote %s: sent=%d ok=%d failed=%d",
				remote, rc.sent, rc.ok, rc.sent-rc.ok))
		}
	}
	return lines
}

// jsonLog appends one line per record; each line is one write, so a killed client loses none.
type jsonLog struct {
	mu   sync.Mutex
	file *os.File
}

func openLog(path string) (*jsonLog, error) {
	if path == "" {
		return &jsonLog{}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, usagef("cannot open log %s: %s", path, oneLine(err))
	}
	return &jsonLog{file: f}, nil
}

func (l *jsonLog) write(r interface{}) {
	line, err := json.Marshal(r)
	if err != nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		_, _ = l.file.Write(append(line, '\n'))
	}
}

func (l *jsonLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		_ = l.file.Close()
		l.file = nil
	}
}

// ---------------------------------------------------------------------------------------------
// Schedule

// schedule hands out (k, due) with due = t0 + k*interval until count, duration or stop.
type schedule struct {
	mu       sync.Mutex
	t0       float64
	interval float64
	count    int
	duration float64
	next     int
	stopped  bool
}

func (s *schedule) take() (int, float64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.next
	if s.stopped || (s.count > 0 && k >= s.count) {
		return 0, 0, false
	}
	if s.duration > 0 && (float64(k)*s.interval >= s.duration || monoNow()-s.t0 >= s.duration) {
		return 0, 0, false
	}
	s.next++
	return k, s.t0 + float64(k)*s.interval, true
}

func (s *schedule) stop() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
}

// ---------------------------------------------------------------------------------------------
// Client

type dialNoteKey struct{}

// dialNote carries the addresses of a connection dialled for a request whose TLS handshake
// may then fail (GotConn never fires then); the dial runs in another goroutine.
type dialNote struct {
	mu     sync.Mutex
	local  *net.TCPAddr
	remote net.Addr
}

type client struct {
	cfg      *config
	tls      *tls.Config
	log      *jsonLog
	connLog  *jsonLog
	pid      int
	sched    *schedule
	stopCh   chan struct{}
	shared   *http.Transport // --connection new without --transport-per-request
	outMu    sync.Mutex
	mu       sync.Mutex // guards everything below and every record in inFlight
	records  []*record
	inFlight map[int]*record
	connIDs  map[string]string // connKey -> conn_id, set when dialled
	conns    int
	done     int
}

func newClient(cfg *config, tlsConf *tls.Config, log, connLog *jsonLog) *client {
	c := &client{cfg: cfg, tls: tlsConf, log: log, connLog: connLog, pid: os.Getpid(),
		stopCh: make(chan struct{}), inFlight: map[int]*record{}, connIDs: map[string]string{}}
	c.sched = &schedule{t0: monoNow(), interval: cfg.interval, count: cfg.count,
		duration: cfg.duration}
	if !cfg.reuse && !cfg.perRequest {
		c.shared = c.newTransport(false)
	}
	return c
}

func (c *client) say(line string) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	_, _ = fmt.Fprintln(os.Stdout, line)
}

// newTransport never wraps the net.Conn: Go-TLS uprobes (USM's and ours) follow tls.Conn to
// the *net.TCPConn under it, and a wrapper would hide the socket from them.
func (c *client) newTransport(keepAlive bool) *http.Transport {
	tr := &http.Transport{
		DialContext:         c.dial,
		TLSClientConfig:     c.tls.Clone(),
		TLSHandshakeTimeout: c.cfg.timeout,
		DisableKeepAlives:   !keepAlive,
		DisableCompression:  true,
		MaxIdleConnsPerHost: 1,
		ForceAttemptHTTP2:   c.cfg.http2,
	}
	if !c.cfg.http2 {
		// A non-nil empty map turns net/http's built-in HTTP/2 off: plain HTTP/1.1, no ALPN.
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		// The TLS handshake here instead of in net/http, so that tls.Conn.Close is seen
		// (trackedConn): the tls.Conn and the *net.TCPConn under it stay exactly as net/http
		// makes them; only the handle net/http holds is ours.
		tr.DialTLSContext = c.dialTLS
	}
	return tr
}

// trackedConn is the *tls.Conn net/http uses, noting when its Close runs: whether a tls.Conn
// that USM caches was ever closed is what decides if its cache entry is deleted.
type trackedConn struct {
	*tls.Conn
	c      *client
	event  connEvent
	closed sync.Once
}

func (t *trackedConn) Close() error {
	t.closed.Do(func() {
		closed := t.event
		closed.Event, closed.Mono = "close", monoNow()
		closed.NetFD, closed.FD, closed.LocalPort, closed.Remote = "", nil, 0, ""
		t.c.connLog.write(&closed)
	})
	return t.Conn.Close()
}

func (c *client) dialTLS(ctx context.Context, network, addr string) (net.Conn, error) {
	raw, err := c.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	conf := c.tls.Clone()
	if host, _, splitErr := net.SplitHostPort(addr); splitErr == nil {
		conf.ServerName = host
	}
	tc := tls.Client(raw, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, err
	}
	tracked := &trackedConn{Conn: tc, c: c}
	ptr, netFD, fd := connIdentity(tc)
	local, _ := raw.LocalAddr().(*net.TCPAddr)
	c.mu.Lock()
	id := c.connIDs[connKey(raw.LocalAddr(), raw.RemoteAddr())]
	c.mu.Unlock()
	tracked.event = connEvent{Event: "open", Pid: c.pid, ConnID: id, TLSConn: ptr, NetFD: netFD,
		FD: fd, Remote: raw.RemoteAddr().String(), Mono: monoNow()}
	if local != nil {
		tracked.event.LocalPort = local.Port
	}
	c.connLog.write(&tracked.event)
	return tracked, nil
}

// connIdentity is what USM's Go-TLS caches see of a connection: the *tls.Conn address, the
// *net.netFD under it (the first word of *net.TCPConn, whose conn struct starts with fd), and
// the socket's fd number.
func connIdentity(tc *tls.Conn) (string, string, *int) {
	ptr := fmt.Sprintf("%#x", uintptr(unsafe.Pointer(tc)))
	tcp, ok := tc.NetConn().(*net.TCPConn)
	if !ok {
		return ptr, "", nil
	}
	netFD := fmt.Sprintf("%#x", *(*uintptr)(unsafe.Pointer(tcp)))
	var fd *int
	if raw, err := tcp.SyscallConn(); err == nil {
		_ = raw.Control(func(sysfd uintptr) {
			n := int(sysfd)
			fd = &n
		})
	}
	return ptr, netFD, fd
}

// tlsConnOf finds the *tls.Conn net/http got for a request.
func tlsConnOf(conn net.Conn) *tls.Conn {
	switch v := conn.(type) {
	case *trackedConn:
		return v.Conn
	case *tls.Conn:
		return v
	}
	return nil
}

func (c *client) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: c.cfg.timeout}
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	local, _ := conn.LocalAddr().(*net.TCPAddr)
	c.mu.Lock()
	c.conns++
	c.connIDs[connKey(conn.LocalAddr(), conn.RemoteAddr())] = fmt.Sprintf("%d-%d", c.pid, c.conns)
	c.mu.Unlock()
	if note, ok := ctx.Value(dialNoteKey{}).(*dialNote); ok && local != nil {
		note.mu.Lock()
		note.local, note.remote = local, conn.RemoteAddr()
		note.mu.Unlock()
	}
	return conn, nil
}

// connKey names a TCP connection by both ends: with several servers, Linux may give two
// connections the same local port when they go to different servers.
func connKey(local, remote net.Addr) string {
	return local.String() + ">" + remote.String()
}

// setLocal records the connection a request went out on; caller holds c.mu.
func (c *client) setLocal(r *record, local *net.TCPAddr, remote net.Addr) {
	ip, port := local.IP.String(), local.Port
	r.LocalAddr, r.LocalPort = &ip, &port
	if id, ok := c.connIDs[connKey(local, remote)]; ok {
		r.ConnID = &id
	}
}

// skipsClose spreads the skipped closes evenly: exactly floor(n*ratio) of the first n requests.
func (c *client) skipsClose(seq int) bool {
	r := c.cfg.skipClose
	return math.Floor(float64(seq+1)*r) > math.Floor(float64(seq)*r)
}

func (c *client) run() {
	var wg sync.WaitGroup
	for i := 0; i < c.cfg.concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.work()
		}()
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	var grace <-chan time.Time
	stopped := ""
	for {
		select {
		case <-finished:
			c.finish(stopped)
			return
		case sig := <-sigs:
			if stopped != "" {
				c.abandonInFlight()
				c.finish(stopped)
				return
			}
			stopped = "SIGINT"
			if sig == syscall.SIGTERM {
				stopped = "SIGTERM"
			}
			c.sched.stop()
			close(c.stopCh)
			grace = time.After(stopGrace)
		case <-grace:
			c.abandonInFlight()
			c.finish(stopped)
			return
		}
	}
}

func (c *client) finish(stopped string) {
	if stopped != "" {
		c.say("Stopped by " + stopped)
	}
}

func (c *client) work() {
	var tr *http.Transport
	switch {
	case c.cfg.reuse:
		tr = c.newTransport(true)
		defer tr.CloseIdleConnections()
	case !c.cfg.perRequest:
		tr = c.shared
	}
	for {
		seq, due, ok := c.sched.take()
		if !ok || !c.waitUntil(due) {
			return
		}
		use := tr
		if c.cfg.perRequest {
			use = c.newTransport(false) // dropped afterwards: the churn pattern described in docs/background.md
		}
		c.request(seq, due, use)
		c.mu.Lock()
		c.done++
		collect := c.cfg.gcEvery > 0 && c.done%c.cfg.gcEvery == 0
		c.mu.Unlock()
		if collect {
			runtime.GC()
		}
	}
}

// waitUntil sleeps until due on the monotonic clock; false if stopped meanwhile.
func (c *client) waitUntil(due float64) bool {
	for {
		remaining := due - monoNow()
		if remaining <= 0 {
			return true
		}
		if remaining > 3600 {
			remaining = 3600 // a nanosecond Duration overflows past 292 years; re-check hourly
		}
		timer := time.NewTimer(time.Duration(remaining * float64(time.Second)))
		select {
		case <-c.stopCh:
			timer.Stop()
			return false
		case <-timer.C:
		}
	}
}

// request sends request seq to server seq%n. In reuse mode the worker's transport keeps one
// idle connection per server (MaxIdleConnsPerHost), so rotating servers still reuses them.
func (c *client) request(seq int, due float64, tr *http.Transport) {
	t := c.cfg.targets[seq%len(c.cfg.targets)]
	path := t.basePath + expandPath(c.cfg.paths[seq%len(c.cfg.paths)], t.port)
	rec := &record{Seq: seq, Pid: c.pid, Tid: syscall.Gettid(), Remote: t.remote,
		Method: "GET", Path: path, ScheduledMono: due, StartMono: monoNow(), StartWall: wallNow()}
	c.mu.Lock()
	c.inFlight[seq] = rec
	c.mu.Unlock()

	note := &dialNote{}
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		var ptr, netFD string
		var fd *int
		if tc := tlsConnOf(info.Conn); tc != nil {
			ptr, netFD, fd = connIdentity(tc)
		}
		c.mu.Lock()
		rec.WroteRequest = true
		c.mu.Unlock()
		if local, ok := info.Conn.LocalAddr().(*net.TCPAddr); ok {
			c.mu.Lock()
			c.setLocal(rec, local, info.Conn.RemoteAddr())
			if ptr != "" {
				rec.TLSConn, rec.FD = &ptr, fd
				if netFD != "" {
					rec.NetFD = &netFD
				}
			}
			c.mu.Unlock()
		}
	}}
	ctx := httptrace.WithClientTrace(context.WithValue(context.Background(), dialNoteKey{}, note), trace)
	// Client.Timeout also bounds an unclosed body: its timer cancels the request, which closes
	// the connection. So with --skip-close a connection lingers for --timeout, then goes.
	hc := &http.Client{Transport: tr, Timeout: c.cfg.timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	var status int
	var skipped bool
	var err error
	if c.cfg.closeNothing {
		status, err = c.dropRequest(rec, t, path)
		skipped = true
	} else {
		status, skipped, err = c.exchange(ctx, hc, seq, t.origin+path)
	}
	endMono, endWall := monoNow(), wallNow()

	c.mu.Lock()
	if err != nil {
		msg := oneLine(err)
		rec.Error = &msg
		if rec.LocalPort == nil {
			note.mu.Lock()
			if note.local != nil {
				c.setLocal(rec, note.local, note.remote)
			}
			note.mu.Unlock()
		}
	} else {
		rec.Status = &status
	}
	rec.EndMono, rec.EndWall = &endMono, &endWall
	_, mine := c.inFlight[seq]
	if mine {
		delete(c.inFlight, seq)
		c.records = append(c.records, rec)
		c.log.write(rec)
	}
	line := describe(rec)
	c.mu.Unlock()
	if mine {
		if skipped {
			line += " (body not closed)"
		}
		c.say(line)
	}
}

// exchange sends the GET; the body is read and closed unless this request skips the close,
// in which case it is neither read nor closed (the classic leak described in docs/background.md).
func (c *client) exchange(ctx context.Context, hc *http.Client, seq int, rawURL string) (int, bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return 0, false, err
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set("Accept", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return 0, false, err
	}
	if c.skipsClose(seq) {
		return resp.StatusCode, true, nil
	}
	_, err = io.Copy(io.Discard, resp.Body)
	closeErr := resp.Body.Close()
	if err == nil {
		err = closeErr
	}
	return resp.StatusCode, false, err
}

// dropRequest sends one GET over a TLS connection of its own and reads the status line, then
// drops the connection without closing it: a tls.Conn that USM caches and whose Close never
// runs, its socket closed by the netFD finalizer at a later GC (--gc-every).
func (c *client) dropRequest(rec *record, t target, path string) (int, error) {
	d := net.Dialer{Timeout: c.cfg.timeout}
	raw, err := d.Dial("tcp", t.remote)
	if err != nil {
		return 0, err
	}
	local, _ := raw.LocalAddr().(*net.TCPAddr)
	conf := c.tls.Clone()
	conf.ServerName = t.host
	tc := tls.Client(raw, conf)
	_ = tc.SetDeadline(time.Now().Add(c.cfg.timeout))
	c.mu.Lock()
	c.conns++
	id := fmt.Sprintf("%d-%d", c.pid, c.conns)
	if local != nil {
		ip, port := local.IP.String(), local.Port
		rec.LocalAddr, rec.LocalPort = &ip, &port
	}
	rec.ConnID = &id
	c.mu.Unlock()
	if err := tc.Handshake(); err != nil {
		return 0, err
	}
	ptr, netFD, fd := connIdentity(tc)
	c.mu.Lock()
	rec.TLSConn, rec.NetFD, rec.FD = &ptr, &netFD, fd
	c.mu.Unlock()
	open := connEvent{Event: "open", Pid: c.pid, ConnID: id, TLSConn: ptr, NetFD: netFD, FD: fd,
		Remote: t.remote, Mono: monoNow()}
	if local != nil {
		open.LocalPort = local.Port
	}
	c.connLog.write(&open)
	c.mu.Lock()
	rec.WroteRequest = true
	c.mu.Unlock()
	request := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n"+
		"Accept: application/json\r\nConnection: close\r\n\r\n", path, t.remote, userAgent)
	if _, err := tc.Write([]byte(request)); err != nil {
		return 0, err
	}
	line, err := bufio.NewReader(tc).ReadString('\n')
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(line)
	if len(fields) < 2 || !strings.HasPrefix(fields[0], "HTTP/") {
		return 0, fmt.Errorf("malformed status line %q", strings.TrimSpace(line))
	}
	status, err := strconv.Atoi(fields[1])
	if err != nil {
		return 0, fmt.Errorf("malformed status line %q", strings.TrimSpace(line))
	}
	return status, nil // tc is dropped here, never closed
}

func describe(r *record) string {
	outcome := ""
	if r.Error != nil {
		outcome = "error: " + *r.Error
	} else {
		outcome = fmt.Sprintf("%d (%.1f ms)", *r.Status, (*r.EndMono-r.StartMono)*1000)
	}
	return fmt.Sprintf("[%d] %s %s -> %s", r.Seq, r.Method, r.Path, outcome)
}

// abandonInFlight records requests still running when the stop grace ran out as interrupted.
func (c *client) abandonInFlight() {
	c.mu.Lock()
	seqs := make([]int, 0, len(c.inFlight))
	for seq := range c.inFlight {
		seqs = append(seqs, seq)
	}
	sort.Ints(seqs)
	lines := make([]string, 0, len(seqs))
	for _, seq := range seqs {
		r := *c.inFlight[seq]
		msg := "interrupted: client stopped before the response arrived"
		endMono, endWall := monoNow(), wallNow()
		r.Error, r.Status, r.EndMono, r.EndWall = &msg, nil, &endMono, &endWall
		delete(c.inFlight, seq)
		c.records = append(c.records, &r)
		c.log.write(&r)
		lines = append(lines, describe(&r))
	}
	c.mu.Unlock()
	for _, line := range lines {
		c.say(line)
	}
}

// ---------------------------------------------------------------------------------------------
// Readiness check

func isVerifyError(err error) bool {
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	return errors.As(err, &unknown) || errors.As(err, &host) || errors.As(err, &invalid)
}

// checkReady retries bare TLS handshakes (no HTTP) until every server completed one, within
// one timeout for all: the runner waits for the whole lab to be up, not for each server.
func checkReady(cfg *config, tlsConf *tls.Config) int {
	deadline := time.Now().Add(cfg.timeout)
	pending := append([]target(nil), cfg.targets...)
	last := map[string]string{}
	for len(pending) > 0 && time.Until(deadline) > 0 {
		var still []target
		for _, t := range pending {
			remaining := time.Until(deadline)
			if remaining <= 0 {
				still = append(still, t)
				continue
			}
			if remaining > 2*time.Second {
				remaining = 2 * time.Second
			}
			err := handshake(t, tlsConf, remaining)
			if err == nil {
				continue
			}
			if isVerifyError(err) {
				fmt.Fprintf(os.Stderr, "error: TLS handshake with %s: %s\n", t.remote, oneLine(err))
				return exitFailed
			}
			last[t.remote] = oneLine(err)
			still = append(still, t)
		}
		pending = still
		if len(pending) > 0 {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if len(pending) == 0 {
		fmt.Println("ready")
		return exitOK
	}
	failures := make([]string, 0, len(pending))
	for _, t := range pending {
		why, tried := last[t.remote]
		if !tried {
			why = "no attempt made"
		}
		failures = append(failures, t.remote+": "+why)
	}
	fmt.Fprintf(os.Stderr, "error: no TLS handshake within %g s with %s\n",
		cfg.timeout.Seconds(), strings.Join(failures, "; "))
	return exitFailed
}

// handshake is one TCP connect and TLS handshake with t, then close.
func handshake(t target, tlsConf *tls.Config, timeout time.Duration) error {
	conf := tlsConf.Clone()
	conf.ServerName = t.host
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", t.remote, conf)
	if err == nil {
		_ = conn.Close()
	}
	return err
}

// ---------------------------------------------------------------------------------------------
// Entry point

func run(args []string) int {
	cfg, err := parseConfig(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println("usage: goclient [-url URL[,URL...]] [-count N] [-interval D] [--concurrency N] " +
			"[--connection new|reuse] [--duration D] [--paths P1,P2] [--cacert FILE] [--log FILE] " +
			"[--timeout D] [--http2] [--transport-per-request] [--skip-close RATIO] " +
			"[--gc-every N] [--conn-log FILE] [--close-nothing] [--check]")
		return exitOK
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		return exitUsage
	}
	tlsConf, err := tlsConfig(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		return exitUsage
	}
	if cfg.check {
		return checkReady(cfg, tlsConf)
	}
	log, err := openLog(cfg.logPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		return exitUsage
	}
	defer log.close()
	connLog, err := openLog(cfg.connLogPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		return exitUsage
	}
	defer connLog.close()

	// stdout gone (closed pipe): keep the requests and the jsonl going, as the Python client.
	signal.Ignore(syscall.SIGPIPE)
	fmt.Printf("Starting TLS client (PID: %d)\n", os.Getpid())
	c := newClient(cfg, tlsConf, log, connLog)
	c.run()
	c.mu.Lock()
	records := append([]*record(nil), c.records...)
	c.mu.Unlock()
	failed := false
	for _, r := range records {
		if !r.ok() {
			failed = true
		}
	}
	remotes := make([]string, 0, len(cfg.targets))
	for _, t := range cfg.targets {
		remotes = append(remotes, t.remote)
	}
	for _, line := range summary(records, remotes) {
		c.say(line)
	}
	if failed {
		return exitFailed
	}
	return exitOK
}

func main() {
	os.Exit(run(os.Args[1:]))
}
