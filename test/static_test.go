package test

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The binary the Dockerfile builds (CGO_ENABLED=0, -trimpath) is static and
// starts from an empty environment, as in a distroless or scratch image.
func TestStaticBinaryAsTheDockerfileBuildsIt(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "sidecar")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=9.9.9-test", "-o", bin, "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the binary asks for a dynamic loader: not static")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary links %v", libs)
	}
	cmd := exec.Command(bin, "-version")
	cmd.Env = []string{}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "sidecar 9.9.9-test ") {
		t.Errorf("-version from an empty environment: %v %q", err, out)
	}
}
