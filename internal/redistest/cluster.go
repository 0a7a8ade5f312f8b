package redistest

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ClusterNodeTimeout is the cluster-node-timeout of StartCluster's nodes:
// a primary unreachable this long is failed over to its replica.
const ClusterNodeTimeout = 1000 * time.Millisecond

// Cluster is a Redis Cluster whose nodes are redis-server processes on
// loopback ports.
type Cluster struct {
	t     testing.TB
	Nodes []*Server // every node, primaries first as created
}

// StartCluster starts primaries×(1+replicasPerPrimary) cluster-enabled
// redis-server processes, joins them with `redis-cli --cluster create`
// and returns once every node reports cluster_state:ok and every replica
// has synced with its primary.
func StartCluster(t testing.TB, primaries, replicasPerPrimary int) *Cluster {
	t.Helper()
	if primaries < 3 {
		t.Fatalf("redistest: Redis Cluster needs at least 3 primaries, got %d", primaries)
	}
	dir := t.TempDir()
	c := &Cluster{t: t}
	n := primaries * (1 + replicasPerPrimary)
	for range n {
		addr := freeAddr(t, true)
		_, port, _ := net.SplitHostPort(addr)
		s := &Server{t: t, Addr: addr, dir: dir, args: serverArgs(addr,
			"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(dir, "nodes-"+port+".conf"),
			"--cluster-node-timeout", strconv.Itoa(int(ClusterNodeTimeout.Milliseconds())),
			"--dir", dir)}
		t.Cleanup(s.Kill)
		s.start()
		c.Nodes = append(c.Nodes, s)
	}
	args := []string{"--cluster", "create"}
	args = append(args, c.Addrs()...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicasPerPrimary), "--cluster-yes")
	cmd := exec.Command("redis-cli", args...)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("redistest: redis-cli --cluster create did not finish in 30s:\n%s", out)
	}
	if err != nil {
		t.Fatalf("redistest: redis-cli --cluster create: %v\n%s", err, out)
	}
	took := waitFor(t, 20*time.Second, "cluster formation", func() string {
		masters := 0
		for _, s := range c.Nodes {
			info, err := doString(s.Addr, "CLUSTER", "INFO")
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			if st := infoField(info, "cluster_state"); st != "ok" {
				return s.Addr + ": cluster_state:" + st
			}
			if k := infoField(info, "cluster_known_nodes"); k != strconv.Itoa(n) {
				return s.Addr + " knows " + k + " nodes"
			}
			repl, err := doString(s.Addr, "INFO", "replication")
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			switch infoField(repl, "role") {
			case "master":
				masters++
			case "slave":
				if st := infoField(repl, "master_link_status"); st != "up" {
					return s.Addr + ": replica link " + st
				}
			}
		}
		if masters != primaries {
			return fmt.Sprintf("%d primaries, want %d", masters, primaries)
		}
		return ""
	})
	t.Logf("redistest: cluster of %d nodes ready (%v after redis-cli --cluster create)", n, took.Round(time.Millisecond))
	return c
}

// Addrs lists every node's address (seeds for a cluster client).
func (c *Cluster) Addrs() []string { return addrs(c.Nodes) }

// Node returns the node at addr, or nil.
func (c *Cluster) Node(addr string) *Server {
	for _, s := range c.Nodes {
		if s.Addr == addr {
			return s
		}
	}
	return nil
}

// clusterNode is one line of CLUSTER NODES.
type clusterNode struct {
	id, addr string
	flags    []string
	slots    [][2]int
}

func (n clusterNode) primary() bool {
	return slices.Contains(n.flags, "master") && !n.failed()
}

func (n clusterNode) failed() bool {
	return slices.Contains(n.flags, "fail") || slices.Contains(n.flags, "fail?")
}

func (n clusterNode) owns(slot int) bool {
	for _, r := range n.slots {
		if slot >= r[0] && slot <= r[1] {
			return true
		}
	}
	return false
}

// nodes asks the node at addr for its view of the cluster.
func nodes(addr string) ([]clusterNode, error) {
	text, err := doString(addr, "CLUSTER", "NODES")
	if err != nil {
		return nil, err
	}
	var out []clusterNode
	for line := range strings.SplitSeq(strings.TrimSpace(text), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		n := clusterNode{id: f[0], addr: strings.SplitN(strings.SplitN(f[1], "@", 2)[0], ",", 2)[0],
			flags: strings.Split(f[2], ",")}
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") { // a slot being migrated
				continue
			}
			lo, hi, ok := strings.Cut(r, "-")
			a, _ := strconv.Atoi(lo)
			b := a
			if ok {
				b, _ = strconv.Atoi(hi)
			}
			n.slots = append(n.slots, [2]int{a, b})
		}
		out = append(out, n)
	}
	return out, nil
}

// live returns the nodes whose process runs.
func (c *Cluster) live() []*Server {
	var out []*Server
	for _, s := range c.Nodes {
		if s.PID() != 0 {
			out = append(out, s)
		}
	}
	return out
}

// Primaries lists the addresses of the primaries that serve slots, as the
// first live node sees them.
func (c *Cluster) Primaries() []string {
	c.t.Helper()
	for _, s := range c.live() {
		ns, err := nodes(s.Addr)
		if err != nil {
			continue
		}
		var out []string
		for _, n := range ns {
			if n.primary() && len(n.slots) > 0 {
				out = append(out, n.addr)
			}
		}
		slices.Sort(out)
		return out
	}
	c.t.Fatal("redistest: no live cluster node answers CLUSTER NODES")
	return nil
}

// Slot is the hash slot of key (CLUSTER KEYSLOT, hash tags included).
func (c *Cluster) Slot(key string) int {
	c.t.Helper()
	for _, s := range c.live() {
		if v, err := Do(s.Addr, "CLUSTER", "KEYSLOT", key); err == nil {
			return int(v.(int64))
		}
	}
	c.t.Fatal("redistest: no live cluster node answers CLUSTER KEYSLOT")
	return 0
}

// PrimaryOf returns the address of the primary serving slot.
func (c *Cluster) PrimaryOf(slot int) string {
	c.t.Helper()
	for _, s := range c.live() {
		ns, err := nodes(s.Addr)
		if err != nil {
			continue
		}
		for _, n := range ns {
			if n.primary() && n.owns(slot) {
				return n.addr
			}
		}
	}
	c.t.Fatalf("redistest: no primary serves slot %d", slot)
	return ""
}

// KillPrimary kills the primary at addr (SIGKILL, by PID) and returns one
// slot it served, for WaitFailover.
func (c *Cluster) KillPrimary(addr string) (slot int) {
	c.t.Helper()
	s := c.Node(addr)
	if s == nil || s.PID() == 0 {
		c.t.Fatalf("redistest: no live node %s", addr)
	}
	ns, err := nodes(addr)
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER NODES on %s: %v", addr, err)
	}
	for _, n := range ns {
		if slices.Contains(n.flags, "myself") {
			if !slices.Contains(n.flags, "master") || len(n.slots) == 0 {
				c.t.Fatalf("redistest: %s is not a primary serving slots (%v)", addr, n.flags)
			}
			slot = n.slots[0][0]
		}
	}
	s.Kill()
	return slot
}

// WaitFailover waits until a replica has taken over slot from the killed
// primary dead: every live node reports cluster_state:ok and names the
// same live primary for slot, which it returns.
func (c *Cluster) WaitFailover(dead string, slot int) string {
	c.t.Helper()
	var owner string
	took := waitFor(c.t, 30*time.Second, "failover of "+dead, func() string {
		owner = ""
		for _, s := range c.live() {
			info, err := doString(s.Addr, "CLUSTER", "INFO")
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			if st := infoField(info, "cluster_state"); st != "ok" {
				return s.Addr + ": cluster_state:" + st
			}
			ns, err := nodes(s.Addr)
			if err != nil {
				return s.Addr + ": " + err.Error()
			}
			var o string
			for _, n := range ns {
				if n.primary() && n.owns(slot) {
					o = n.addr
				}
			}
			switch {
			case o == "" || o == dead:
				return fmt.Sprintf("%s: slot %d still served by %q", s.Addr, slot, o)
			case owner != "" && o != owner:
				return fmt.Sprintf("nodes disagree on slot %d: %s and %s", slot, owner, o)
			}
			owner = o
		}
		return ""
	})
	c.t.Logf("redistest: slot %d moved from %s to %s %v after the wait began", slot, dead, owner, took.Round(time.Millisecond))
	return owner
}
