// Package container adapts the Go runtime to the container it runs in.
//
// GOMAXPROCS already follows the cgroup CPU limit (Go 1.25+, gated by the
// go line in go.mod). GOMEMLIMIT does not follow the memory limit, so
// SetMemoryLimit sets it to a share of the cgroup's memory limit when the
// GOMEMLIMIT environment variable is not set.
package container

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// DefaultRatio is the share of the container's memory limit given to the
// Go heap: the rest is for goroutine stacks, socket buffers outside the
// heap, and the kernel.
const DefaultRatio = 0.75

// ErrNoLimit means the cgroup sets no memory limit.
var ErrNoLimit = errors.New("container: no memory limit")

// FS says where to read: Root is the cgroup mount (normally
// /sys/fs/cgroup) and SelfCgroup the contents of /proc/self/cgroup.
type FS struct {
	Root       string
	SelfCgroup string
}

// HostFS reads the real cgroup of this process.
func HostFS() (FS, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return FS{}, err
	}
	return FS{Root: "/sys/fs/cgroup", SelfCgroup: string(b)}, nil
}

// MemoryLimit returns the memory limit of the cgroup, in bytes, for cgroup
// v2 (memory.max) or v1 (memory.limit_in_bytes). Looking up the tree from
// the process's own cgroup, the tightest limit wins.
func (fs FS) MemoryLimit() (int64, error) {
	var v2Path, v1Path string
	sc := bufio.NewScanner(strings.NewReader(fs.SelfCgroup))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2Path = parts[2]
		case containsController(parts[1], "memory"):
			v1Path = parts[2]
		}
	}
	type source struct{ dir, file, path string }
	var candidates []source
	if v1Path != "" {
		candidates = append(candidates, source{filepath.Join(fs.Root, "memory"), "memory.limit_in_bytes", v1Path})
	}
	if v2Path != "" {
		candidates = append(candidates, source{fs.Root, "memory.max", v2Path})
	}
	best := int64(math.MaxInt64)
	found := false
	for _, c := range candidates {
		for p := c.path; ; p = filepath.Dir(p) {
			if n, ok := readLimit(filepath.Join(c.dir, p, c.file)); ok && n < best {
				best, found = n, true
			}
			if p == "/" || p == "." || p == "" {
				break
			}
		}
	}
	// cgroup v1 reports "no limit" as a huge number (page-rounded MaxInt64).
	if !found || best >= 1<<62 {
		return 0, ErrNoLimit
	}
	return best, nil
}

// readLimit reads one limit file; "max" and unreadable files are no limit.
func readLimit(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil && n > 0
}

func containsController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// SetMemoryLimit sets GOMEMLIMIT to ratio × the container's memory limit,
// unless the GOMEMLIMIT environment variable is set (it wins). It returns
// the limit in force and where it came from, for the start-up log.
func SetMemoryLimit(fs FS, ratio float64) (limit int64, source string, err error) {
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		return debug.SetMemoryLimit(-1), "GOMEMLIMIT environment variable", nil
	}
	cg, err := fs.MemoryLimit()
	if err != nil {
		return debug.SetMemoryLimit(-1), "none (no container memory limit)", nil
	}
	limit = int64(float64(cg) * ratio)
	debug.SetMemoryLimit(limit)
	return limit, fmt.Sprintf("%.0f%% of the cgroup memory limit (%d bytes)", ratio*100, cg), nil
}
