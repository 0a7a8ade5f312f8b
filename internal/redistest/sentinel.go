package redistest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// MasterName is the name StartSentinel's sentinels monitor.
const MasterName = "mymaster"

// SentinelDownAfter is the sentinels' down-after-milliseconds: a primary
// unreachable this long is failed over.
const SentinelDownAfter = 1000 * time.Millisecond

// Sentinel is one primary, its replica and three Sentinels watching them.
type Sentinel struct {
	t         testing.TB
	Servers   []*Server // the data nodes: the primary, then the replica
	Sentinels []*Server
}

// StartSentinel starts a primary, a replica of it (--replicaof) and three
// sentinels (quorum 2), and returns once the replica has synced and every
// sentinel knows the replica and the two other sentinels, so that a
// failover can happen.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	dir := t.TempDir()
	st := &Sentinel{t: t}
	primary := &Server{t: t, Addr: freeAddr(t, false), dir: dir}
	primary.args = serverArgs(primary.Addr)
	t.Cleanup(primary.Kill)
	primary.start()
	host, port, _ := net.SplitHostPort(primary.Addr)
	replica := &Server{t: t, Addr: freeAddr(t, false), dir: dir}
	replica.args = serverArgs(replica.Addr, "--replicaof", host, port)
	t.Cleanup(replica.Kill)
	replica.start()
	st.Servers = []*Server{primary, replica}
	waitFor(t, 10*time.Second, "replica sync", func() string {
		info, err := doString(replica.Addr, "INFO", "replication")
		if err != nil {
			return err.Error()
		}
		if s := infoField(info, "master_link_status"); s != "up" {
			return "replica link " + s
		}
		return ""
	})
	for i := range 3 {
		addr := freeAddr(t, false)
		_, sport, _ := net.SplitHostPort(addr)
		conf := filepath.Join(dir, fmt.Sprintf("sentinel-%d.conf", i))
		text := fmt.Sprintf("port %s\nbind 127.0.0.1\nprotected-mode no\ndir %s\nloglevel warning\n"+
			"sentinel monitor %s %s %s 2\n"+
			"sentinel down-after-milliseconds %s %d\n"+
			"sentinel failover-timeout %s 5000\n"+
			"sentinel parallel-syncs %s 1\n",
			sport, dir, MasterName, host, port, MasterName, SentinelDownAfter.Milliseconds(), MasterName, MasterName)
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		s := &Server{t: t, Addr: addr, dir: dir, args: []string{conf, "--sentinel"}}
		t.Cleanup(s.Kill)
		s.start()
		st.Sentinels = append(st.Sentinels, s)
	}
	took := waitFor(t, 20*time.Second, "sentinels discovering each other", func() string {
		for _, s := range st.Sentinels {
			v, err := Do(s.Addr, "SENTINEL", "MASTER", MasterName)
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			m := pairs(v)
			if m["num-other-sentinels"] != "2" || m["num-slaves"] != "1" || m["flags"] != "master" {
				return fmt.Sprintf("%s: flags %s, %s other sentinels, %s replicas", s.Addr,
					m["flags"], m["num-other-sentinels"], m["num-slaves"])
			}
		}
		return ""
	})
	t.Logf("redistest: primary %s, replica %s, 3 sentinels ready in %v", primary.Addr, replica.Addr, took.Round(time.Millisecond))
	return st
}

// pairs turns a flat [field, value, ...] reply into a map.
func pairs(v any) map[string]string {
	m := map[string]string{}
	arr, _ := v.([]any)
	for i := 0; i+1 < len(arr); i += 2 {
		k, _ := arr[i].(string)
		switch x := arr[i+1].(type) {
		case string:
			m[k] = x
		case int64:
			m[k] = fmt.Sprint(x)
		}
	}
	return m
}

// Addrs lists the sentinels' addresses.
func (st *Sentinel) Addrs() []string { return addrs(st.Sentinels) }

// Master returns the primary's address as the first answering sentinel
// reports it.
func (st *Sentinel) Master() string {
	st.t.Helper()
	for _, s := range st.Sentinels {
		if addr, err := masterAddr(s.Addr); err == nil {
			return addr
		}
	}
	st.t.Fatal("redistest: no sentinel answers get-master-addr-by-name")
	return ""
}

func masterAddr(sentinel string) (string, error) {
	v, err := Do(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MasterName)
	if err != nil {
		return "", err
	}
	arr, ok := v.([]any)
	if !ok || len(arr) != 2 {
		return "", fmt.Errorf("redistest: get-master-addr-by-name answered %v", v)
	}
	return net.JoinHostPort(arr[0].(string), arr[1].(string)), nil
}

// KillPrimary kills the current primary (SIGKILL, by PID) and returns its
// address.
func (st *Sentinel) KillPrimary() string {
	st.t.Helper()
	addr := st.Master()
	for _, s := range st.Servers {
		if s.Addr == addr && s.PID() != 0 {
			s.Kill()
			return addr
		}
	}
	st.t.Fatalf("redistest: the sentinels' primary %s is not a live server of this test", addr)
	return ""
}

// WaitFailover waits until every sentinel names a new primary instead of
// dead and that server reports role:master; it returns its address.
func (st *Sentinel) WaitFailover(dead string) string {
	st.t.Helper()
	var now string
	took := waitFor(st.t, 30*time.Second, "sentinel failover from "+dead, func() string {
		now = ""
		for _, s := range st.Sentinels {
			addr, err := masterAddr(s.Addr)
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			if addr == dead || (now != "" && addr != now) {
				return fmt.Sprintf("sentinel %s names %s", s.Addr, addr)
			}
			now = addr
		}
		info, err := doString(now, "INFO", "replication")
		if err != nil {
			return now + ": " + err.Error()
		}
		if r := infoField(info, "role"); r != "master" {
			return now + ": role " + r
		}
		return ""
	})
	st.t.Logf("redistest: sentinels moved the primary from %s to %s %v after the wait began", dead, now, took.Round(time.Millisecond))
	return now
}
