// Command goserver is the lab's Kubernetes-API look-alike in Go (crypto/tls, net/http).
//
// The reproduction that showed the misattribution used two Go TLS servers, and the Python
// server limits churn to a few hundred requests a second. This server answers the same
// endpoints as server.py (its controller half: usmlab/run/stages.py), takes the same flags, and
// writes the same server.jsonl (docs/formats.md): one JSON line per response, logged before it
// is sent. It prints "Starting TLS server on :PORT (PID: N)" once it holds the port; a port in
// use exits 98. SIGINT or SIGTERM stop it cleanly. Standard library only, builds with Go 1.19.
package main

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const (
	defaultHost       = "127.0.0.1"
	defaultPort       = 8443
	creationTimestamp = "2024-01-15T10:00:00Z"
	resourceVersion   = "104857"
	clockMonotonic    = 1
	exitUsage         = 2
	exitListenFailed  = 1
	exitAddressInUse  = 98
)

var (
	persistentVolumes = []string{
		"pvc-63958627-daf8-4858-bf79-3818733c87b4",
		"pvc-33641375-8db3-4ff3-b172-2ba76ce132fe",
		"pvc-12345678-1234-1234-1234-123456789abc",
	}
	namespaces = []string{"default", "kube-system", "datadog-agent", "orgstore-maze"}
)

type object = map[string]interface{}

func monoNow() float64 {
	var ts syscall.Timespec
	_, _, errno := syscall.RawSyscall(
		syscall.SYS_CLOCK_GETTIME, clockMonotonic, uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		panic("clock_gettime(CLOCK_MONOTONIC): " + errno.Error())
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

// uid is stable per (namespace, name), like server.py's uuid5.
func uid(ns, name string) string {
	sum := sha1.Sum([]byte("usmlab/" + ns + "/" + name))
	return fmt.Sprintf("%x-%x-%x-%x-%x", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
}

func metadata(name, ns string) object {
	meta := object{"name": name, "uid": uid(ns, name), "resourceVersion": resourceVersion,
		"creationTimestamp": creationTimestamp}
	if ns != "" {
		meta["namespace"] = ns
	}
	return meta
}

func list(kind string, items []object) object {
	return object{"kind": kind, "apiVersion": "v1",
		"metadata": object{"resourceVersion": resourceVersion}, "items": items}
}

func volume(name string) object {
	return object{"kind": "PersistentVolume", "apiVersion": "v1", "metadata": metadata(name, ""),
		"spec": object{"capacity": object{"storage": "10Gi"}, "accessModes": []string{"ReadWriteOnce"},
			"persistentVolumeReclaimPolicy": "Delete", "storageClassName": "gp2",
			"volumeMode": "Filesystem"},
		"status": object{"phase": "Bound"}}
}

func failure(code int, message string) object {
	return object{"kind": "Status", "apiVersion": "v1", "metadata": object{}, "status": "Failure",
		"message": message, "reason": strings.ReplaceAll(http.StatusText(code), " ", ""),
		"code": code}
}

// route answers a GET of path (query ignored) as server.py's route does.
func route(path string, port, pid int, name string) (int, object) {
	bare := strings.SplitN(path, "?", 2)[0]
	parts := strings.Split(strings.Trim(bare, "/"), "/")
	for _, p := range parts {
		if p == "" {
			return 404, failure(404, "the server could not find the requested resource")
		}
	}
	if len(parts) == 2 && parts[1] == "identify" && strings.HasPrefix(parts[0], "server") {
		if parts[0] == fmt.Sprintf("server%d", port) {
			return 200, object{"kind": "ServerIdentity", "port": port, "pid": pid, "name": name}
		}
		return 404, failure(404, fmt.Sprintf("this is server%d (port %d), not %s", port, port, parts[0]))
	}
	if len(parts) >= 2 && parts[0] == "api" && parts[1] == "v1" {
		rest := parts[2:]
		switch {
		case len(rest) == 1 && rest[0] == "persistentvolumes":
			items := []object{}
			for _, n := range persistentVolumes {
				items = append(items, volume(n))
			}
			return 200, list("PersistentVolumeList", items)
		case len(rest) == 2 && rest[0] == "persistentvolumes":
			return 200, volume(rest[1])
		case len(rest) == 1 && rest[0] == "namespaces":
			items := []object{}
			for _, n := range namespaces {
				items = append(items, object{"kind": "Namespace", "apiVersion": "v1",
					"metadata": metadata(n, ""), "spec": object{"finalizers": []string{"kubernetes"}},
					"status": object{"phase": "Active"}})
			}
			return 200, list("NamespaceList", items)
		case len(rest) == 3 && rest[0] == "namespaces" && rest[2] == "configmaps":
			ns := rest[1]
			return 200, list("ConfigMapList", []object{
				{"kind": "ConfigMap", "apiVersion": "v1", "metadata": metadata("kube-root-ca.crt", ns),
					"data": object{"ca.crt": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n"}},
				{"kind": "ConfigMap", "apiVersion": "v1", "metadata": metadata(ns+"-config", ns),
					"data": object{"log_level": "info"}},
			})
		case len(rest) == 3 && rest[0] == "namespaces" && rest[2] == "pods":
			ns := rest[1]
			return 200, list("PodList", []object{{"kind": "Pod", "apiVersion": "v1",
				"metadata": metadata(ns+"-0", ns),
				"spec":     object{"containers": []object{{"name": "main", "image": "registry.local/" + ns + ":1"}}},
				"status":   object{"phase": "Running", "podIP": "10.0.0.10"}}})
		}
	}
	return 404, failure(404, "the server could not find the requested resource")
}

// record is one server.jsonl line, in server.py's field order.
type record struct {
	Wall      float64 `json:"wall"`
	Mono      float64 `json:"mono"`
	Pid       int     `json:"pid"`
	Tid       int     `json:"tid"`
	Method    string  `json:"method"`
	Path      string  `json:"path"`
	PeerAddr  string  `json:"peer_addr"`
	PeerPort  int     `json:"peer_port"`
	LocalPort int     `json:"local_port"`
	Status    int     `json:"status"`
	ConnID    *string `json:"conn_id"`
}

type server struct {
	port    int
	pid     int
	name    string
	logMu   sync.Mutex
	log     io.Writer
	outMu   sync.Mutex
	served  int64
	accepts int64
}

type connIDKey struct{}

func (s *server) say(line string) {
	s.outMu.Lock()
	defer s.outMu.Unlock()
	_, _ = fmt.Fprintln(os.Stdout, line)
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	mono, wall := monoNow(), float64(time.Now().UnixNano())/1e9
	status, body := 405, failure(405, "method not allowed")
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		status, body = route(r.URL.RequestURI(), s.port, s.pid, s.name)
	}
	peerHost, peerPort, _ := net.SplitHostPort(r.RemoteAddr)
	port, _ := strconv.Atoi(peerPort)
	rec := record{Wall: wall, Mono: mono, Pid: s.pid, Tid: syscall.Gettid(), Method: r.Method,
		Path: r.URL.RequestURI(), PeerAddr: peerHost, PeerPort: port, LocalPort: s.port,
		Status: status}
	if id, ok := r.Context().Value(connIDKey{}).(string); ok {
		rec.ConnID = &id
	}
	if s.log != nil {
		line, _ := json.Marshal(rec)
		s.logMu.Lock()
		_, _ = s.log.Write(append(line, '\n'))
		s.logMu.Unlock()
	}
	atomic.AddInt64(&s.served, 1)
	payload, _ := json.Marshal(body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(payload)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(payload)
	}
	s.say(fmt.Sprintf("%s %s -> %d (conn %s, peer %s)", r.Method, rec.Path, status,
		deref(rec.ConnID), r.RemoteAddr))
}

func deref(s *string) string {
	if s == nil {
		return "-"
	}
	return *s
}

func run(args []string) int {
	fs := flag.NewFlagSet("goserver", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	host := fs.String("host", defaultHost, "address to listen on")
	port := fs.Int("port", defaultPort, "0 picks a free port")
	cert := fs.String("cert", "", "server certificate (PEM)")
	key := fs.String("key", "", "server private key (PEM)")
	logPath := fs.String("log", "", "server.jsonl path (appended to)")
	name := fs.String("name", "", "name returned by /server<port>/identify")
	if err := fs.Parse(args); err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		return exitUsage
	}
	if *cert == "" || *key == "" {
		fmt.Fprintln(os.Stderr, "error: --cert and --key are required")
		return exitUsage
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ERROR: cannot load certificate/key: "+err.Error())
		return exitUsage
	}
	s := &server{pid: os.Getpid()}
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ERROR: cannot open log %s: %s\n", *logPath, err)
			return exitUsage
		}
		defer f.Close()
		s.log = f
	}
	where := net.JoinHostPort(*host, strconv.Itoa(*port))
	ln, err := net.Listen("tcp", where)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			fmt.Fprintf(os.Stderr, "ERROR: cannot listen on %s: address already in use\n", where)
			return exitAddressInUse
		}
		fmt.Fprintf(os.Stderr, "ERROR: cannot listen on %s: %s\n", where, err)
		return exitListenFailed
	}
	s.port = ln.Addr().(*net.TCPAddr).Port
	s.name = *name
	if s.name == "" {
		s.name = fmt.Sprintf("server%d", s.port)
	}
	srv := &http.Server{
		Handler: s,
		// HTTP/1.1 only, as server.py: no h2 by ALPN.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		TLSConfig:    &tls.Config{Certificates: []tls.Certificate{pair}},
		IdleTimeout:  75 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			n := atomic.AddInt64(&s.accepts, 1)
			return context.WithValue(ctx, connIDKey{}, fmt.Sprintf("%d-%d", s.pid, n))
		},
	}
	shown := fmt.Sprintf(":%d", s.port)
	if *host != defaultHost {
		shown = net.JoinHostPort(*host, strconv.Itoa(s.port))
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	fmt.Printf("Starting TLS server on %s (PID: %d)\n", shown, s.pid)
	select {
	case <-sigs:
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = srv.Shutdown(ctx)
		cancel()
	case err := <-done:
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintln(os.Stderr, "ERROR: "+err.Error())
			return exitListenFailed
		}
	}
	s.say(fmt.Sprintf("Server stopped: %d requests served", atomic.LoadInt64(&s.served)))
	return 0
}

func main() {
	os.Exit(run(os.Args[1:]))
}
