// Package redistest starts real redis-server processes on free loopback
// ports for tests, so that tests can kill, freeze (SIGSTOP) and restart
// them: a single server (Start), a Redis Cluster of primaries and replicas
// (StartCluster), and a primary with a replica watched by three Sentinels
// (StartSentinel). Every process is killed by its PID when the test ends.
// It is used by tests only.
package redistest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one redis-server process.
type Server struct {
	t    testing.TB
	Addr string
	// TLSAddr is the TLS listener of a server started with TLS files
	// (StartProtected); Addr stays plain, for the tests' own probes.
	TLSAddr string
	args    []string // after the binary; the port is in them
	dir     string   // working directory; "" is the test's
	cmd     *exec.Cmd
}

// Protected says how StartProtected secures a server.
type Protected struct {
	// Password is the default user's password (requirepass).
	Password string
	// User and UserPassword add an ACL user allowed every command and key.
	User, UserPassword string
	// TLSCert, TLSKey and TLSCA are PEM files: with them the server also
	// listens with TLS on TLSAddr (clients need no certificate).
	TLSCert, TLSKey, TLSCA string
}

// StartProtected runs redis-server like Start, with passwords, an ACL
// user and TLS as p asks.
func StartProtected(t testing.TB, p Protected) *Server {
	t.Helper()
	addr := freeAddr(t, false)
	var extra []string
	if p.Password != "" {
		extra = append(extra, "--requirepass", p.Password)
	}
	if p.User != "" {
		extra = append(extra, "--user", p.User, "on", ">"+p.UserPassword, "~*", "&*", "+@all")
	}
	s := &Server{t: t, Addr: addr}
	if p.TLSCert != "" {
		s.TLSAddr = freeAddr(t, false)
		_, tlsPort, _ := net.SplitHostPort(s.TLSAddr)
		extra = append(extra, "--tls-port", tlsPort, "--tls-cert-file", p.TLSCert, "--tls-key-file", p.TLSKey,
			"--tls-ca-cert-file", p.TLSCA, "--tls-auth-clients", "no")
	}
	s.args = serverArgs(addr, extra...)
	s.start()
	t.Cleanup(s.Kill)
	return s
}

// Start runs redis-server on a free loopback port; the test fails if
// redis-server is not installed (`make test` installs it).
func Start(t testing.TB) *Server {
	t.Helper()
	addr := freeAddr(t, false)
	s := &Server{t: t, Addr: addr, args: serverArgs(addr)}
	s.start()
	t.Cleanup(s.Kill)
	return s
}

func serverArgs(addr string, extra ...string) []string {
	_, port, _ := net.SplitHostPort(addr)
	return append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--protected-mode", "no", "--loglevel", "warning",
		// A replica syncs at once instead of after the default 5 s wait
		// for more replicas to share a diskless transfer.
		"--repl-diskless-sync-delay", "0"}, extra...)
}

// freeAddr returns a loopback address whose port was free a moment ago;
// with bus, port+10000 (Redis Cluster's bus port) was free too.
func freeAddr(t testing.TB, bus bool) string {
	t.Helper()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().(*net.TCPAddr)
		if !bus {
			ln.Close()
			return addr.String()
		}
		if addr.Port+10000 > 65535 {
			ln.Close()
			continue
		}
		bl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", addr.Port+10000))
		ln.Close()
		if err != nil {
			continue
		}
		bl.Close()
		return addr.String()
	}
	t.Fatal("redistest: no free port pair for a cluster node")
	return ""
}

func (s *Server) start() {
	s.t.Helper()
	s.cmd = exec.Command("redis-server", s.args...)
	s.cmd.Dir = s.dir
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("starting redis-server (install it: apt-get install redis-server): %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		// A server with a password answers NOAUTH: it is up.
		if err := s.Ping(); err == nil || strings.HasPrefix(err.Error(), "NOAUTH") {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.t.Fatalf("redis-server on %s did not answer PING", s.Addr)
}

// addrs lists the servers' addresses, in order.
func addrs(servers []*Server) []string {
	out := make([]string, len(servers))
	for i, s := range servers {
		out[i] = s.Addr
	}
	return out
}

// Ping sends PING over a fresh connection.
func (s *Server) Ping() error {
	v, err := Do(s.Addr, "PING")
	if err != nil {
		return err
	}
	if v != "PONG" {
		return fmt.Errorf("redis answered %q", v)
	}
	return nil
}

// PID is the process id, or 0 once the server was killed.
func (s *Server) PID() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Kill stops the server (SIGKILL) and waits for it.
func (s *Server) Kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT) // a frozen process must run to die cleanly
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Restart starts the server again on the same port (empty: no persistence).
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	s.start()
}

// Freeze stops the process with SIGSTOP: connections stay open, nothing answers.
func (s *Server) Freeze() { _ = s.cmd.Process.Signal(syscall.SIGSTOP) }

// Thaw resumes a frozen server.
func (s *Server) Thaw() { _ = s.cmd.Process.Signal(syscall.SIGCONT) }

// Do sends one command to addr through a go-redis client of its own
// (RESP2, one fresh connection, 200 ms to connect, 2 s for the command,
// no retries) and returns the reply as go-redis gives it: a string
// (simple or bulk), an int64, nil, or []any for arrays. An error reply is
// returned as an error whose text is Redis' own ("NOAUTH ...").
func Do(addr string, args ...string) (any, error) {
	return DoAs(addr, "", "", args...)
}

// DoAs is Do as an ACL user (the client authenticates before the
// command); an empty user is Do.
func DoAs(addr, user, password string, args ...string) (any, error) {
	// The connection is dialled here, not by go-redis, so that a server
	// not yet (or no longer) listening is one quiet error: go-redis's pool
	// would retry the dial and log every failure, and start polls PING
	// until the server answers.
	nc, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return nil, err
	}
	defer nc.Close() // go-redis closes it too, unless it never took it
	var dialled atomic.Bool
	rdb := redis.NewClient(&redis.Options{
		Addr: addr,
		Dialer: func(context.Context, string, string) (net.Conn, error) {
			if dialled.Swap(true) {
				return nil, errors.New("redistest: one connection per command")
			}
			return nc, nil
		},
		// RESP2 keeps the shapes callers read: INFO as a string, SENTINEL
		// MASTER as a flat array (RESP3 would make them verbatim strings
		// and maps).
		Protocol:        2,
		Username:        user,
		Password:        password,
		PoolSize:        1,
		MaxRetries:      -1,
		DisableIdentity: true, // no CLIENT SETINFO in the commandstats tests read
		ReadTimeout:     2 * time.Second,
		WriteTimeout:    2 * time.Second,
	})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cmd := make([]any, len(args))
	for i, a := range args {
		cmd[i] = a
	}
	v, err := rdb.Do(ctx, cmd...).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return v, err
}

// doString is Do for commands that answer with text (INFO, CLUSTER INFO,
// CLUSTER NODES).
func doString(addr string, args ...string) (string, error) {
	v, err := Do(addr, args...)
	if err != nil {
		return "", err
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("redistest: %v answered %T", args, v)
	}
	return s, nil
}

// infoField returns field of an INFO-style "key:value" text.
func infoField(text, field string) string {
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}

// waitFor polls cond every 20 ms until it returns "" or d passes; then
// the test fails with what cond returned last.
func waitFor(t testing.TB, d time.Duration, what string, cond func() string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		why := cond()
		if why == "" {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("redistest: %s: not done after %v: %s", what, d, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Counter is a TCP forwarder in front of a Server that counts the bytes
// clients send, so a test can prove that no command was sent.
type Counter struct {
	Addr string
	sent atomic.Int64
	ln   net.Listener
}

// CountBytes starts a forwarder to target.
func CountBytes(t testing.TB, target string) *Counter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &Counter{Addr: ln.Addr().String(), ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer client.Close()
				up, err := net.DialTimeout("tcp", target, time.Second)
				if err != nil {
					return
				}
				defer up.Close()
				go func() {
					_, _ = io.Copy(client, up)
					client.Close()
				}()
				buf := make([]byte, 32<<10)
				for {
					n, err := client.Read(buf)
					if n > 0 {
						c.sent.Add(int64(n))
						if _, werr := up.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return c
}

// Sent is the number of bytes clients have sent through the forwarder.
func (c *Counter) Sent() int64 { return c.sent.Load() }
