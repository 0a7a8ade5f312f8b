// Package test holds the end-to-end tests: they build the real sidecar
// binary, start it against real backends on 127.0.0.1, and check what
// crosses the wire.
package test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var sidecarBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sidecar-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sidecarBin = filepath.Join(dir, "sidecar")
	args := []string{"build", "-o", sidecarBin}
	if os.Getenv("SIDECAR_E2E_RACE") != "" {
		args = append(args, "-race") // a data-race hunt; memory bounds do not hold under -race
	}
	build := exec.Command("go", append(args, "..")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building sidecar:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	return freeAddrs(t, 1)[0]
}

// freeAddrs returns n distinct free loopback addresses: the listeners are
// all open while the ports are chosen, so the kernel cannot hand out the
// same port twice (it did: a sidecar got the same proxy and admin port).
func freeAddrs(t testing.TB, n int) []string {
	t.Helper()
	addrs := make([]string, n)
	for i := range addrs {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		addrs[i] = ln.Addr().String()
	}
	return addrs
}

// sidecar is a running sidecar process started by a test.
type sidecar struct {
	t      testing.TB
	cmd    *exec.Cmd
	Addr   string // proxy listener
	Admin  string // admin listener
	Config string // path of the config file
	logs   *syncBuffer
	waited chan struct{}
	exit   error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startSidecar writes cfg (the [server] listen addresses are prepended) to a
// temp file, starts the binary and waits until /readyz answers 200.
func startSidecar(t testing.TB, cfg string, extraArgs ...string) *sidecar {
	t.Helper()
	addrs := freeAddrs(t, 2)
	s := &sidecar{t: t, Addr: addrs[0], Admin: addrs[1], logs: &syncBuffer{}, waited: make(chan struct{})}
	s.Config = filepath.Join(t.TempDir(), "sidecar.toml")
	s.writeConfig(cfg)
	return s.run(nil, extraArgs...)
}

// run starts the binary on s.Config with extra environment variables and
// waits until /readyz answers 200.
func (s *sidecar) run(env []string, extraArgs ...string) *sidecar {
	t := s.t
	t.Helper()
	args := append([]string{"-config", s.Config, "-watch-interval", "200ms"}, extraArgs...)
	s.cmd = exec.Command(sidecarBin, args...)
	s.cmd.Env = append(os.Environ(), env...)
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.exit = s.cmd.Wait(); close(s.waited) }()
	t.Cleanup(s.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if resp, err := http.Get("http://" + s.Admin + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return s
			}
		}
		select {
		case <-s.waited:
			t.Fatalf("sidecar exited early: %v\n%s", s.exit, s.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar not ready after 10s\n%s", s.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// writeConfig replaces the config file; the [server] addresses stay.
func (s *sidecar) writeConfig(cfg string) {
	s.t.Helper()
	full := cfg
	if strings.Contains(cfg, "[server]") {
		full = strings.Replace(cfg, "[server]", fmt.Sprintf("[server]\nlisten = %q\nadmin_listen = %q", s.Addr, s.Admin), 1)
	} else {
		full = fmt.Sprintf("[server]\nlisten = %q\nadmin_listen = %q\n\n%s", s.Addr, s.Admin, cfg)
	}
	tmp := s.Config + ".tmp"
	if err := os.WriteFile(tmp, []byte(full), 0o600); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Rename(tmp, s.Config); err != nil {
		s.t.Fatal(err)
	}
}

func (s *sidecar) signal(sig syscall.Signal) {
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}

// stop sends SIGTERM and waits; a process that does not exit is killed.
func (s *sidecar) stop() {
	select {
	case <-s.waited:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.waited:
	case <-time.After(15 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.waited
	}
	if logs := s.logs.String(); strings.Contains(logs, "DATA RACE") || strings.Contains(logs, "panic:") {
		s.t.Errorf("sidecar reported a data race or crashed:\n%s", logs)
	}
}

// wait waits for the process to exit and returns its exit code.
func (s *sidecar) wait(d time.Duration) int {
	s.t.Helper()
	select {
	case <-s.waited:
	case <-time.After(d):
		s.t.Fatalf("sidecar did not exit within %s\n%s", d, s.logs.String())
	}
	if logs := s.logs.String(); strings.Contains(logs, "DATA RACE") || strings.Contains(logs, "panic:") {
		s.t.Errorf("sidecar reported a data race or crashed:\n%s", logs)
	}
	if s.exit == nil {
		return 0
	}
	if ee, ok := s.exit.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// statusField reads a "Vm*:" field of /proc/PID/status in bytes.
func (s *sidecar) statusField(name string) int64 {
	s.t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		s.t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, name+":"); ok {
			f := strings.Fields(rest)
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			return kb << 10
		}
	}
	s.t.Fatalf("no %s in /proc status", name)
	return 0
}

// peakRSS is the process's VmHWM.
func (s *sidecar) peakRSS() int64 { return s.statusField("VmHWM") }

// resetPeakRSS makes VmHWM start again from the current RSS.
func (s *sidecar) resetPeakRSS() {
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", s.cmd.Process.Pid), []byte("5"), 0o200)
}

func (s *sidecar) url(path string) string { return "http://" + s.Addr + path }

// metric returns the value of one exact series line on /metrics, or -1.
func (s *sidecar) metric(series string) float64 {
	s.t.Helper()
	resp, err := http.Get("http://" + s.Admin + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			v, _ := strconv.ParseFloat(rest, 64)
			return v
		}
	}
	return -1
}

// rawRequest sends raw bytes on a new connection and returns everything
// the sidecar answers until it closes or d passes.
func rawRequest(t testing.TB, addr, req string, d time.Duration) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(d))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(c)
	return string(b)
}

// rawStatus sends req (lines ended by "\n", sent as CRLF) on a new
// connection and returns the status and body of the answer.
func rawStatus(t testing.TB, addr, req string) (int, string) {
	t.Helper()
	resp := rawRequest(t, addr, strings.ReplaceAll(req, "\n", "\r\n"), 5*time.Second)
	r, err := http.ReadResponse(bufio.NewReader(strings.NewReader(resp)), nil)
	if err != nil {
		t.Fatalf("%q: %v (%q)", req, err, resp)
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	return r.StatusCode, string(b)
}

// backend is a real HTTP server on 127.0.0.1 that counts what it gets.
type backend struct {
	*http.Server
	Addr     string
	mu       sync.Mutex
	requests int
	conns    int
	last     *http.Request
	lastBody []byte
}

func startBackend(t testing.TB, h http.HandlerFunc) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{Addr: ln.Addr().String()}
	b.Server = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b.mu.Lock()
			b.requests++
			b.last = r
			b.mu.Unlock()
			h(w, r)
		}),
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateNew {
				b.mu.Lock()
				b.conns++
				b.mu.Unlock()
			}
		},
	}
	go func() { _ = b.Serve(ln) }()
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func (b *backend) counts() (requests, conns int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.requests, b.conns
}

func (b *backend) lastRequest() *http.Request {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.last
}

func (b *backend) url() string { return "http://" + b.Addr }

// routeTo is the smallest config body: one upstream, one catch-all route.
func routeTo(upstreamURL string, upstreamExtra string) string {
	return fmt.Sprintf(`
[upstreams.app]
url = %q
%s

[[routes]]
name = "app"
path_prefix = "/"
upstream = "app"
`, upstreamURL, upstreamExtra)
}

// rawBackend accepts connections and answers each with handle.
func rawBackend(t testing.TB, handle func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// readRequestHead reads one request head from a raw connection.
func readRequestHead(br *bufio.Reader) (string, error) {
	var b strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return b.String(), err
		}
		b.WriteString(line)
		if line == "\r\n" {
			return b.String(), nil
		}
	}
}
