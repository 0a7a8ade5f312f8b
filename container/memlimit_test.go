package container

import (
	"errors"
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"
)

func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestMemoryLimitFromFakeCgroups(t *testing.T) {
	cases := []struct {
		name  string
		self  string
		files map[string]string
		want  int64
		err   error
	}{
		{"v2 pod limit", "0::/kubepods/pod1/ctr\n", map[string]string{
			"kubepods/pod1/ctr/memory.max": "max\n",
			"kubepods/pod1/memory.max":     "536870912\n",
			"kubepods/memory.max":          "max\n",
		}, 536870912, nil},
		{"v2 container tighter than pod", "0::/a/b\n", map[string]string{
			"a/b/memory.max": "268435456\n",
			"a/memory.max":   "1073741824\n",
		}, 268435456, nil},
		{"v2 unlimited", "0::/a\n", map[string]string{"a/memory.max": "max\n"}, 0, ErrNoLimit},
		{"v1", "12:cpu,cpuacct:/docker/x\n11:memory:/docker/x\n", map[string]string{
			"memory/docker/x/memory.limit_in_bytes": "209715200\n",
		}, 209715200, nil},
		{"v1 unlimited", "11:memory:/docker/x\n", map[string]string{
			"memory/docker/x/memory.limit_in_bytes": "9223372036854771712\n",
		}, 0, ErrNoLimit},
		{"no cgroup files", "0::/\n", map[string]string{}, 0, ErrNoLimit},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fs := FS{Root: tree(t, c.files), SelfCgroup: c.self}
			got, err := fs.MemoryLimit()
			if !errors.Is(err, c.err) || got != c.want {
				t.Errorf("MemoryLimit() = %d, %v; want %d, %v", got, err, c.want, c.err)
			}
		})
	}
}

func TestSetMemoryLimitArithmetic(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(prev)
	t.Setenv("GOMEMLIMIT", "")
	os.Unsetenv("GOMEMLIMIT")
	fs := FS{Root: tree(t, map[string]string{"c/memory.max": "1000000000\n"}), SelfCgroup: "0::/c\n"}
	limit, source, err := SetMemoryLimit(fs, DefaultRatio)
	if err != nil || limit != 750_000_000 || debug.SetMemoryLimit(-1) != 750_000_000 {
		t.Errorf("limit %d (%s), runtime %d, err %v; want 750000000", limit, source, debug.SetMemoryLimit(-1), err)
	}
	t.Setenv("GOMEMLIMIT", "123MiB")
	debug.SetMemoryLimit(123 << 20)
	if limit, source, _ := SetMemoryLimit(fs, DefaultRatio); limit != 123<<20 || source != "GOMEMLIMIT environment variable" {
		t.Errorf("an explicit GOMEMLIMIT was overridden: %d (%s)", limit, source)
	}
}
